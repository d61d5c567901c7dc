"""The embedded corpus builder: split sizes, exact text, determinism, caching."""
import os
import sysconfig
import time

import pytest

from switchjax.data import corpus


def read_split(builder, split):
    source = builder.as_data_source(split)
    return [{k: (v.decode() if isinstance(v, bytes) else int(v)) for k, v in source[i].items()}
            for i in range(len(source))]


def texts_by_file(examples):
    chunks = {}
    for ex in examples:
        chunks.setdefault(ex["path"], {})[ex["chunk"]] = ex["text"]
    return {path: "".join(c[i] for i in range(len(c))) for path, c in chunks.items()}


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory):
    """The default corpus (this interpreter's stdlib), built once per session."""
    data_dir = str(tmp_path_factory.mktemp("stdlib_corpus"))
    start = time.perf_counter()
    builder = corpus.prepare_embedded_corpus(data_dir, [])
    return builder, data_dir, time.perf_counter() - start


def test_stdlib_corpus_splits_and_text_match_the_files(stdlib_corpus):
    builder, _, seconds = stdlib_corpus
    assert seconds < 30, f"building the stdlib corpus took {seconds:.1f} s"
    source = builder.builder_config.source
    assert source.root == os.path.realpath(sysconfig.get_paths()["stdlib"])
    assert len(source.relpaths) > 300
    assert any(r.endswith(".txt") for r in source.relpaths)  # docs are included
    assert not any(part in ("site-packages", "test", "tests", "__pycache__")
                   for r in source.relpaths for part in r.split(os.sep))
    train, validation = read_split(builder, "train"), read_split(builder, "validation")
    assert train and validation
    expected_chunks = sum(len(corpus.chunk_text(source.read(r))) for r in source.relpaths)
    assert len(train) + len(validation) == expected_chunks
    assert builder.info.splits["train"].num_examples == len(train)
    train_files, validation_files = texts_by_file(train), texts_by_file(validation)
    assert not set(train_files) & set(validation_files)  # a file is in one split only
    assert set(train_files) | set(validation_files) == set(source.relpaths)
    for path, text in {**train_files, **validation_files}.items():
        with open(os.path.join(source.root, path), "rb") as f:
            assert text == f.read().decode("utf-8", errors="replace"), path
    assert set(validation_files) == set(corpus.split_files(source.relpaths)["validation"])


def test_stdlib_corpus_is_reused(stdlib_corpus, monkeypatch):
    builder, data_dir, _ = stdlib_corpus

    def fail(*args):
        raise AssertionError("rebuilt although the corpus was prepared")

    monkeypatch.setattr(corpus.EmbeddedText, "_generate_examples", fail)
    again = corpus.prepare_embedded_corpus(data_dir, [])
    assert again.data_dir == builder.data_dir
    assert read_split(again, "validation") == read_split(builder, "validation")


@pytest.fixture
def text_files(tmp_path):
    """Twelve small files in two directories; doc3 has 700 lines of 100
    characters: chunks of 327 + 327 + 46 lines."""
    root = tmp_path / "texts"
    for i in range(12):
        path = root / ("a" if i % 2 else "b") / f"doc{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"document {i} line {j}: {'lorem ipsum ' * (j % 7)}\n" for j in range(20)]
        if i == 3:
            lines = [f"{j:05d}{'x' * 94}\n" for j in range(700)]
        path.write_text("".join(lines))
    (root / "empty.txt").write_text("")  # empty files are skipped
    return root


def test_build_is_deterministic_and_matches_files(text_files, tmp_path):
    globs = [str(text_files / "**" / "*.txt")]
    one = corpus.prepare_embedded_corpus(str(tmp_path / "one"), globs)
    two = corpus.prepare_embedded_corpus(str(tmp_path / "two"), globs)
    assert one.builder_config.name == two.builder_config.name
    for split in ("train", "validation"):
        assert read_split(one, split) == read_split(two, split)  # same order too
    examples = read_split(one, "train") + read_split(one, "validation")
    assert len(examples) == 12 + 2  # doc3 has 3 chunks
    assert max(len(ex["text"]) for ex in examples) <= corpus.MAX_CHUNK_CHARS
    files = texts_by_file(examples)
    assert len(files) == 12
    for path, text in files.items():
        assert text == (text_files / path).read_text()


def test_other_files_or_edits_get_a_new_config(text_files, tmp_path):
    data_dir = str(tmp_path / "data")
    all_files = corpus.prepare_embedded_corpus(data_dir, [str(text_files / "**" / "*.txt")])
    only_a = corpus.prepare_embedded_corpus(data_dir, [str(text_files / "a" / "*.txt")])
    assert only_a.builder_config.name != all_files.builder_config.name
    assert len(texts_by_file(read_split(only_a, "train") + read_split(only_a, "validation"))) == 6
    edited = text_files / "a" / "doc1.txt"
    edited.write_text("a new text\n")
    os.utime(edited, ns=(1, 1))  # a distinct mtime even on coarse-clock filesystems
    rebuilt = corpus.prepare_embedded_corpus(data_dir, [str(text_files / "a" / "*.txt")])
    assert rebuilt.builder_config.name != only_a.builder_config.name
    texts = texts_by_file(read_split(rebuilt, "train") + read_split(rebuilt, "validation"))
    assert texts["doc1.txt"] == "a new text\n"


def test_split_of_a_file_does_not_depend_on_other_files():
    names = tuple(f"dir/file{i}.py" for i in range(400))
    small, large = corpus.split_files(names[:200]), corpus.split_files(names)
    assert set(small["validation"]) == set(large["validation"]) & set(names[:200])
    assert 0.02 < len(large["validation"]) / 400 < 0.1
    assert corpus.split_files(names[:2])["validation"]  # at least one validation file


def test_glob_errors_name_the_field(text_files):
    with pytest.raises(ValueError, match=r"data\.files.*no_such_dir"):
        corpus.glob_files([str(text_files / "**" / "*.txt"), str(text_files / "no_such_dir" / "*")])
    with pytest.raises(ValueError, match=r"data\.files.*at least 2"):
        corpus.glob_files([str(text_files / "a" / "doc1.txt")])


def test_chunk_text_concatenates_back_and_respects_the_limit():
    text = "".join(f"{'x' * (i % 50)}\n" for i in range(1000)) + "no newline at end"
    chunks = corpus.chunk_text(text, max_chars=200)
    assert "".join(chunks) == text
    assert all(len(c) <= 200 for c in chunks) and len(chunks) > 10
    assert corpus.chunk_text("y" * 500, max_chars=200) == ["y" * 500]  # one long line
