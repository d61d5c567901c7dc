"""Every bad input the tests try and the exact message it gets (docs/errors.md).

Each row of CASES is (kind, the bad input, how it is tried, the exact message). The test
runs every row and compares the message character for character; the command-line rows
also check exit status 2, one `error: ...` line and no traceback. docs/errors.md holds
the table rendered from CASES (`test_docs_table_is_current`); after changing a message:

    python tests/test_errors.py          # prints every row's actual message
    python tests/test_errors.py --write  # rewrites the table in docs/errors.md

Paths in messages are written {tmp} (this module's temporary directory), {data} (the
session's data_dir), {stdlib} (the standard library), {repo}, and {corpus} is the name of
the test corpus' build (a hash of its files' paths, sizes and times).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from typing import Callable, Optional

import jax
import pytest
import sentencepiece as spm

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),  # run as a script too
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from _train_utils import (DATA_FILES, REPO, STDLIB, TWO_CHECKPOINTS, cli_args,  # noqa: E402
                          data_dir, env, reference_run, tiny_config, unprivileged)
from switchjax.config import ReportedError  # noqa: E402
from switchjax.train.validate import validate_config  # noqa: E402

DOC = os.path.join(REPO, "docs", "errors.md")
BEGIN = "<!-- begin: table generated from tests/test_errors.py -->"
END = "<!-- end: table generated from tests/test_errors.py -->"


@dataclasses.dataclass
class Case:
    kind: str  # config, mesh, data, tokenizer, checkpoint, init_from, conversion, command line
    bad_input: str  # markdown
    run: Optional[Callable] = None  # (ctx) -> message (in-process rows)
    argv: tuple = ()  # command-line rows: python -m <argv...> (ctx fields formatted in)
    message: str = ""  # exact, with {tmp} {data} {stdlib} {repo}
    unprivileged: bool = False  # run the command under `unprivileged()` (permissions apply)


class Ctx:
    """Files and runs the rows use, made once per module under `tmp`."""

    def __init__(self, tmp: str):
        self.tmp, self.data = tmp, data_dir()
        from switchjax.data import corpus
        self.subs = {"tmp": tmp, "data": self.data, "stdlib": STDLIB, "repo": REPO,
                     "corpus": corpus.source_files(DATA_FILES).config_name}
        self._run = None

    def path(self, *parts) -> str:
        return os.path.join(self.tmp, *parts)

    def write(self, rel: str, content) -> str:
        path = self.path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        return path

    def placeholders(self, text: str) -> str:
        for name in ("tmp", "data", "repo", "stdlib", "corpus"):
            text = text.replace(self.subs[name], "{" + name + "}")
        return text

    # A run with checkpoints at steps 2 and 4, and its abstract state and iterator.
    CKPT = TWO_CHECKPOINTS

    def checkpointed(self, name: str) -> str:
        workdir = self.path("runs", name)
        shutil.copytree(reference_run(tiny_config(**self.CKPT)), workdir)
        return workdir

    def abstract_run(self):
        if self._run is None:
            from switchjax.train import loop
            self._run = loop._Run(tiny_config(**self.CKPT), self.path("runs", "abstract"))
            self._run.build()
        return self._run


def _message(fn, error=ReportedError) -> str:
    try:
        fn()
    except error as e:
        return str(e)
    raise AssertionError("no error was raised")


def _set(config, key: str, value):
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value


def _filled(value, ctx):
    if isinstance(value, str):
        return value.format(**ctx.subs)
    if isinstance(value, tuple):
        return tuple(_filled(v, ctx) for v in value)
    return value


def validate(everything=False, **fields):
    """A row: tiny_config with `fields` ('section.name': value; {tmp} etc. filled in)
    through validate_config, or with `everything` through every check a run makes
    before compiling (mesh against the devices, vocabulary against the tokenizer)."""
    def run(ctx):
        from switchjax.train import loop
        config = tiny_config()
        for key, value in fields.items():
            _set(config, key, _filled(value, ctx))
        return _message(lambda: (loop.validate_run if everything else validate_config)(
            config))
    return run


def validate_run(**fields):
    return validate(everything=True, **fields)


def unknown_field(section: str, name: str, value):
    def run(ctx):
        config = tiny_config()
        config[section].unlock()
        config[section][name] = value
        return _message(lambda: validate_config(config))
    return run


# ----------------------------------------------------------------------------- data, tokenizer


def _files_row(make):
    """A row: data.files = the files `make(ctx)` writes (plus a good one)."""
    def run(ctx):
        paths = make(ctx)
        return validate(**{"data.files": tuple(paths), "data.data_dir": ctx.path("data_new")})(ctx)
    return run


def _deleted_data_file(ctx):
    from switchjax.data import pipeline
    config = tiny_config()
    pipeline.open_source(config.data, "train")  # built in the session data_dir
    copy = ctx.path("data_copy")
    shutil.copytree(ctx.data, copy)
    config.data.data_dir = copy
    source = pipeline.open_source(config.data, "train")
    os.remove(source.file_of(0))
    return _message(lambda: source[0])


def _spm_model(ctx, rel: str, **ids) -> str:
    """A SentencePiece model trained with SentencePiece's own ids unless `ids` says."""
    text = open(os.path.join(STDLIB, "json", "decoder.py")).read().splitlines()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([t for t in text if t.strip()]),
                                   model_writer=model, vocab_size=400, byte_fallback=True,
                                   hard_vocab_limit=False, minloglevel=2, **ids)
    return ctx.write(rel, model.getvalue())


def _corrupt_cached_spm(ctx):
    from switchjax.data.config import spm_cache_path
    config = tiny_config()
    config.data.data_dir = ctx.path("data_spm")
    path = spm_cache_path(config.data)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"\x0a\x05trunc")
    return _message(lambda: validate_config(config))


# ----------------------------------------------------------------------------- checkpoints


def _restore_latest(ctx, workdir: str, abstract=None):
    """(message of restore_latest's error or its first warning, the checkpoints after)."""
    from switchjax.train import checkpoint
    run = ctx.abstract_run()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logging.getLogger().addHandler(handler)
    ckpt = checkpoint.Checkpointer(workdir, 2)
    try:
        ckpt.restore_latest(abstract or run.abstract, run.train_iter)
        message = next(r for r in records if r.startswith("Checkpoint step"))
    except ReportedError as e:
        message = str(e)
    finally:
        logging.getLogger().removeHandler(handler)
        ckpt.close()
    return message


def _truncated_metadata(ctx):
    workdir = ctx.checkpointed("truncated")
    path = os.path.join(workdir, "checkpoints", "4", "state", "_METADATA")
    with open(path, "r+b") as f:
        f.truncate(1000)
    return _restore_latest(ctx, workdir)


def _missing_item(ctx):
    workdir = ctx.checkpointed("missing_item")
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4", "data"))
    return _restore_latest(ctx, workdir)


def _all_incomplete(ctx):
    workdir = ctx.checkpointed("all_incomplete")
    for step in ("2", "4"):
        shutil.rmtree(os.path.join(workdir, "checkpoints", step, "state"))
    return _restore_latest(ctx, workdir)


def _io_error(ctx):
    from switchjax.train import checkpoint
    workdir = ctx.checkpointed("io_error")
    real = checkpoint.Checkpointer.restore

    def restore(self, step, *args, **kwargs):
        if step == 4:  # a flaky network filesystem
            raise OSError(errno.EIO, os.strerror(errno.EIO), self.step_dir(4))
        return real(self, step, *args, **kwargs)

    checkpoint.Checkpointer.restore = restore
    try:
        return _restore_latest(ctx, workdir)
    finally:
        checkpoint.Checkpointer.restore = real


def _wrong_shapes(ctx):
    workdir = ctx.checkpointed("wrong_shapes")
    run = ctx.abstract_run()

    def widen(path, x):
        if jax.tree_util.keystr(path).endswith(".params['token_embedding']"):
            return jax.ShapeDtypeStruct((x.shape[0] + 8,) + x.shape[1:], x.dtype,
                                        sharding=x.sharding)
        return x
    return _restore_latest(ctx, workdir, jax.tree_util.tree_map_with_path(widen, run.abstract))


def _disk_full(ctx):
    """A run of the checkpointed config whose write of step 4 finds the disk full."""
    import builtins
    from switchjax.train import loop
    workdir = ctx.path("runs", "disk_full")
    target, real_open = os.path.join(workdir, "checkpoints", "4."), builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax") and str(file).startswith(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = full_open
    try:
        return _message(lambda: loop.train_and_evaluate(tiny_config(**ctx.CKPT), workdir))
    finally:
        builtins.open = real_open


def _another_config(ctx):
    from switchjax.train import loop
    workdir = ctx.checkpointed("another_config")
    changed = tiny_config(**ctx.CKPT)
    changed.moe.capacity_factor_train = 0.5
    return _message(lambda: loop.train_and_evaluate(changed, workdir))


def _workdir_in_a_file(ctx):
    from switchjax.train import loop
    ctx.write("a_file", "x")
    return _message(lambda: loop.train_and_evaluate(tiny_config(), ctx.path("a_file", "run")))


def _read_state(ctx, step=None, name="read_state"):
    from switchjax.train import checkpoint
    workdir = ctx.checkpointed(name) if step is not None else ctx.path("no_checkpoints")
    os.makedirs(workdir, exist_ok=True)
    return _message(lambda: checkpoint.read_state(workdir, step))


# ----------------------------------------------------------------------------- init_from


def _converted(ctx, name: str, **model) -> str:
    """A directory as experiments/convert_hf.py writes it: zero params of tiny_config with
    `model` ('model.x' / 'moe.x' overrides) and a SentencePiece model of 400 pieces."""
    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np
    from switchjax.config import ModelConfig
    from switchjax.convert import hf_switch
    from switchjax.models import make_model
    out = ctx.path("converted", name)
    if not os.path.exists(out):
        config = tiny_config()
        for key, value in model.items():
            _set(config, key, value)
        batch = {k: jnp.ones((1, 8), jnp.int32)
                 for k in ("encoder_input_tokens", "decoder_input_tokens")}
        shapes = jax.eval_shape(lambda: nn.meta.unbox(make_model(ModelConfig.from_config(
            config)).init(jax.random.key(0), batch)["params"]))
        params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
        hf_switch.save_converted(out, config, params, spm_path=_spm_model(
            ctx, f"converted_spm/{name}.model", pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
    return out


def init_from(name: str, checkpoint: Optional[dict] = None, everything=False, **fields):
    """A row: `validate` with train.init_from = ctx.path(name) (with `checkpoint`, a
    converted directory of tiny_config with those overrides; else made empty)."""
    def run(ctx):
        if checkpoint is not None:
            path = _converted(ctx, name, **checkpoint)
        else:
            path = ctx.path(name)
            os.makedirs(os.path.join(path, "checkpoints", "3"), exist_ok=True)
        return validate(everything, **{"train.init_from": path, **fields})(ctx)
    return run


# ----------------------------------------------------------------------------- conversion

SWITCH_CONFIG = dict(model_type="switch_transformers", vocab_size=96, d_model=32, d_kv=8,
                     d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
                     num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=8,
                     expert_capacity=64, relative_attention_num_buckets=8,
                     relative_attention_max_distance=20)


def convert(name: str, config=None, raw: Optional[str] = None, out: str = "out"):
    """A row: hf_switch.convert of a directory holding only `config` (or `raw` text)."""
    def run(ctx):
        from switchjax.convert import hf_switch
        model = ctx.path("hf", name)
        if config is not None or raw is not None:
            ctx.write(os.path.join("hf", name, "config.json"),
                      raw if raw is not None else json.dumps(config))
        elif name != "missing":
            os.makedirs(model, exist_ok=True)
        return _message(lambda: hf_switch.convert(model, ctx.path("hf_out", out)))
    return run


def _out_exists(ctx):
    from switchjax.convert import hf_switch
    os.makedirs(ctx.path("hf_out", "done", "params"), exist_ok=True)
    return _message(lambda: hf_switch.convert(ctx.path("hf", "any"), ctx.path("hf_out", "done")))


def _without(key):
    return {k: v for k, v in SWITCH_CONFIG.items() if k != key}


# ----------------------------------------------------------------------------- the rows

TRAIN = ("experiments.train", "--config", "configs/cpu_base.py:smoke")

CASES = [
    # Model and MoE fields.
    Case("config", "`model.init_scale=-1.0`", validate(**{"model.init_scale": -1.0}),
         message=('model.init_scale=-1.0: must be > 0 (the standard deviation of the dense '
                  "weights' truncated-normal init is init_scale / sqrt(fan_in)). Fix: use 1.0 "
                  '(T5) or 0.1 (the Switch paper).')),
    Case("config", "`moe.router_init_scale=0.0`", validate(**{"moe.router_init_scale": 0.0}),
         message=('moe.router_init_scale=0.0: must be > 0 (the standard deviation of a '
                  'truncated-normal init). Fix: use 0.1 (the Switch paper) or 1.0.')),
    Case("config", "`moe.expert_init_scale=-0.1`", validate(**{"moe.expert_init_scale": -0.1}),
         message=('moe.expert_init_scale=-0.1: must be > 0 (the standard deviation of a '
                  'truncated-normal init). Fix: use 0.1 (the Switch paper) or 1.0.')),
    Case("config", "`moe.aux_loss_coef=-0.01`", validate(**{"moe.aux_loss_coef": -0.01}),
         message=('moe.aux_loss_coef=-0.01: must be >= 0 (a loss coefficient). Fix: use 0 (off) '
                  "or e.g. 0.01 (the paper's alpha).")),
    Case("config", "`moe.z_loss_coef=-0.001`", validate(**{"moe.z_loss_coef": -0.001}),
         message=('moe.z_loss_coef=-0.001: must be >= 0 (a loss coefficient). Fix: use 0 (off) '
                  'or e.g. 0.001 (ST-MoE).')),
    Case("config", "`model.logit_z_loss=-0.0001`", validate(**{"model.logit_z_loss": -1e-4}),
         message=('model.logit_z_loss=-0.0001: must be >= 0 (a loss coefficient). Fix: use 0 '
                  '(off) or e.g. 1e-4.')),
    Case("config", "`model.layer_norm_epsilon=0.0`", validate(**{"model.layer_norm_epsilon": 0.0}),
         message=('model.layer_norm_epsilon=0.0: must be > 0 (RMSNorm divides by sqrt(mean(x^2) '
                  '+ epsilon)). Fix: e.g. 1e-6.')),
    Case("config", "`model.relative_attention_max_distance=16` (32 buckets)",
         validate(**{"model.relative_attention_max_distance": 16}),
         message=('model.relative_attention_max_distance=16: must exceed the 16 exact offsets of '
                  "the decoder's 32 buckets (the log-spaced buckets span exact range .. "
                  'max_distance). Fix: use e.g. 128 (T5: 128 for 32 buckets).')),
    Case("config", "`model.relative_attention_num_buckets=2` (encoder-decoder)",
         validate(**{"model.relative_attention_num_buckets": 2}),
         message=('model.relative_attention_num_buckets=2: must be at least 4 for '
                  "model.family='encoder_decoder' (else the exact range of each direction of the "
                  'buckets is empty). Fix: use 32 (T5).')),
    Case("config", "`model.d_model=64.5`", validate(**{"model.d_model": 64.5}),
         message='model.d_model=64.5: must be an integer. Fix: e.g. 512.'),
    Case("config", "`model.tie_embeddings='yes'`", validate(**{"model.tie_embeddings": "yes"}),
         message="model.tie_embeddings='yes': must be True or False. Fix: set a bool."),
    Case("config", "`moe.capacity_factor_train=nan`",
         validate(**{"moe.capacity_factor_train": float("nan")}),
         message='moe.capacity_factor_train=nan: must be finite. Fix: e.g. 1.25.'),
    Case("config", "`moe.router='top3'`", validate(**{"moe.router": "top3"}),
         message=("moe.router='top3': unknown router. Fix: use one of ('top1', 'topk', "
                  "'expert_choice', 'dropless').")),
    Case("config", "`model.remat='all'`", validate(**{"model.remat": "all"}),
         message=("model.remat='all': unknown rematerialisation. Fix: use one of ('none', "
                  "'full', 'dots').")),
    Case("config", "`model.d_modle=64` (a misspelled field in a config file)",
         unknown_field("model", "d_modle", 64),
         message=("model.d_modle=64: is not a known field. Fix: use one of ['activation', "
                  "'d_ff', 'd_model', 'decoder_moe_layers', 'dropout_rate', 'dtype', "
                  "'encoder_moe_layers', 'family', 'head_dim', 'init_scale', "
                  "'layer_norm_epsilon', 'logit_z_loss', 'num_decoder_layers', "
                  "'num_encoder_layers', 'num_heads', 'relative_attention_max_distance', "
                  "'relative_attention_num_buckets', 'remat', 'tie_embeddings', 'vocab_size'].")),
    Case("config", "`train.eps=0.0`", validate(**{"train.eps": 0.0}),
         message='train.eps=0.0: must be > 0 (AdamW divides by sqrt(v) + eps). Fix: e.g. 1e-8.'),
    Case("config", "`train.b1=1.0`", validate(**{"train.b1": 1.0}),
         message='train.b1=1.0: must be in [0, 1) (an exponential decay rate). Fix: e.g. 0.9.'),
    Case("config", "`train.b2=-0.1`", validate(**{"train.b2": -0.1}),
         message='train.b2=-0.1: must be in [0, 1) (an exponential decay rate). Fix: e.g. 0.999.'),
    Case("config", "`train.weight_decay=-0.01`", validate(**{"train.weight_decay": -0.01}),
         message='train.weight_decay=-0.01: must be >= 0. Fix: use 0 (off) or e.g. 0.01.'),
    Case("config", "`train.learning_rate=0.0`", validate(**{"train.learning_rate": 0.0}),
         message='train.learning_rate=0.0: must be > 0. Fix: e.g. 0.01 (rsqrt, Adafactor).'),
    Case("config", "`train.warmup_steps=2.5`", validate(**{"train.warmup_steps": 2.5}),
         message='train.warmup_steps=2.5: must be an integer. Fix: e.g. 10000.'),
    Case("config", "`train.accum_steps=3` (batch 8)", validate(**{"train.accum_steps": 3}),
         message=('train.accum_steps=3: does not divide train.batch_size=8. Fix: use a divisor '
                  'of the batch size.')),
    Case("config", "`train.num_train_step=5` (a misspelled field in a config file)",
         unknown_field("train", "num_train_step", 5),
         message=("train.num_train_step=5: is not a known field. Fix: use one of ['accum_steps', "
                  "'b1', 'b2', 'batch_size', 'checkpoint_every', 'end_learning_rate_factor', "
                  "'eps', 'eval_every', 'eval_steps', 'exact_match_examples', 'grad_clip_norm', "
                  "'init_config', 'init_from', 'learning_rate', 'log_every', 'max_to_keep', "
                  "'multiply_by_parameter_scale', 'num_train_steps', 'optimizer', 'schedule', "
                  "'upcycle', 'warmup_steps', 'weight_decay'].")),
    Case("config", "`seed=-1`", validate(seed=-1),
         message='seed=-1: must be an integer >= 0. Fix: e.g. 0.'),
    Case("config", "`data.objective='causal_lm'` with an encoder-decoder",
         validate(**{"data.objective": "causal_lm"}),
         message=("data.objective='causal_lm': does not fit model.family='encoder_decoder'. Fix: "
                  "use data.objective='span_corruption'.")),
    # Mesh.
    Case("mesh", "`mesh.data=3` on 8 devices", validate_run(**{"mesh.data": 3}),
         message=("mesh={'data': 3, 'expert': 1, 'model': 1}: needs 3 devices but 8 are "
                  'available. Fix: make mesh.data*mesh.expert*mesh.model = 8 or set one of them '
                  'to -1.')),
    Case("mesh", "`mesh.expert=0`", validate(**{"mesh.expert": 0}),
         message='mesh.expert=0: must be a positive size or -1 (the rest). Fix: e.g. 1.'),
    Case("mesh", "`mesh.rules=('vocab=tensor',)`", validate(**{"mesh.rules": ("vocab=tensor",)}),
         message=("mesh.rules='vocab=tensor': unknown mesh axis 'tensor'. Fix: use axes of "
                  "('data', 'expert', 'model').")),
    Case("mesh", "`mesh.data=1, mesh.expert=8` with 4 experts",
         validate_run(**{"mesh.data": 1, "mesh.expert": 8}),
         message=('moe.num_experts=4: is not divisible by mesh.expert=8. Fix: make the expert '
                  'axis a divisor of the number of experts.')),
    # Data.
    Case("data", "`data.files` with a glob that matches nothing",
         validate(**{"data.files": ("{tmp}/nothing/*.txt",)}),
         message=("data.files=('{tmp}/nothing/*.txt',): the glob '{tmp}/nothing/*.txt' matches "
                  'no non-empty file. Fix: correct or remove it (data.files=() uses the Python '
                  'standard library).')),
    Case("data", "`data.files` matching a binary file", _files_row(lambda c: [
        c.write("bin/a.py", "print(1)\n"), c.write("bin/b.pyc", b"\x00\x01binary")]),
         message=("data.files=('{tmp}/bin/a.py', '{tmp}/bin/b.pyc'): 1 of the 2 matched files "
                  'are not UTF-8 text: {tmp}/bin/b.pyc (binary: a NUL byte at offset 0). Fix: '
                  "narrow the globs to text files (e.g. '**/*.py', not '**/*').")),
    Case("data", "`data.files` matching a Latin-1 file", _files_row(lambda c: [
        c.write("latin/a.txt", "ok\n"), c.write("latin/b.txt", "caf\xe9\n".encode("latin-1"))]),
         message=("data.files=('{tmp}/latin/a.txt', '{tmp}/latin/b.txt'): 1 of the 2 matched "
                  'files are not UTF-8 text: {tmp}/latin/b.txt (not UTF-8: byte 0xe9 at offset '
                  "3). Fix: narrow the globs to text files (e.g. '**/*.py', not '**/*').")),
    Case("data", "`data.data_dir` inside a regular file (the corpus must be built)",
         lambda c: c.write("a_file", "x") and validate(**{"data.data_dir": "{tmp}/a_file/data"})(c),
         message=("data.data_dir='{tmp}/a_file/data': cannot be created or written: Not a "
                  'directory. Fix: use a writable data.data_dir (the embedded corpus and the '
                  'SentencePiece model will be built there).')),
    Case("data", "`data.name='c4/en:3.1.0'` not prepared in data_dir",
         validate(**{"data.name": "c4/en:3.1.0", "data.files": (),
                     "data.data_dir": "{tmp}"}),
         message=("data.name='c4/en:3.1.0': no such TFDS dataset in data.data_dir='{tmp}' "
                  '(DatasetNotFoundError: Dataset c4 not found.). Fix: run `tfds build c4/en '
                  '--file_format=array_record --data_dir={tmp}` (see README), or point '
                  "data.data_dir at the directory that holds it, or use data.name='embedded'.")),
    Case("data", "`data.text_key='content'`", validate(**{"data.text_key": "content"}),
         message=("data.text_key='content': not a feature of embedded ('text', 'path', 'chunk'). "
                  'Fix: set data.text_key to the text feature.')),
    Case("data", "`data.targets_length=4` (inputs 32)", validate(**{"data.targets_length": 4}),
         message=("data.targets_length=4: T5's random_spans_helper needs 8 for inputs_length=32 "
                  '(chunks of 34 tokens). Fix: set data.targets_length=8.')),
    Case("data", "`data.noise_density=1.0`", validate(**{"data.noise_density": 1.0}),
         message='data.noise_density=1.0: must be in (0, 1). Fix: T5 uses 0.15.'),
    Case("data", "`data.pack='yes'`", validate(**{"data.pack": "yes"}),
         message="data.pack='yes': must be True or False. Fix: set a bool."),
    Case("data", "a data file deleted before it was read", _deleted_data_file,
         message=(('data file '
                   "'{tmp}/data_copy/embedded_text/{corpus}/1.0.0/embedded_text-train.array_record-00000-of-00001': "
                   "reading record 0 of split 'train' failed (RuntimeError: open() failed: No "
                   'such file or directory; opening '
                   '{tmp}/data_copy/embedded_text/{corpus}/1.0.0/embedded_text-train.array_record-00000-of-00001). '
                   'Fix: restore the file (or rebuild the dataset: the embedded corpus is rebuilt '
                   'when its directory in data.data_dir is deleted).'))),
    # Tokenizer.
    Case("tokenizer", "`data.spm_path` that does not exist",
         validate(**{"data.spm_path": "{tmp}/none.model"}),
         message=("data.spm_path='{tmp}/none.model': no such file. Fix: give the path of a "
                  "SentencePiece .model file, or '' to train one locally.")),
    Case("tokenizer", "`data.spm_path` that is not a SentencePiece model", lambda c: validate(
        **{"data.spm_path": c.write("garbage.model", b"\x0a\x05not a model")})(c),
         message=(("data.spm_path='{tmp}/garbage.model': {tmp}/garbage.model is not a "
                   'SentencePiece model (it does not parse). Fix: give a .model file written by '
                   "SentencePiece with --pad_id=0 --eos_id=1 --unk_id=2 --bos_id=-1, or '' to "
                   'train one locally.'))),
    Case("tokenizer", "`data.spm_path` that is empty", lambda c: validate(
        **{"data.spm_path": c.write("empty.model", b"")})(c),
         message=("data.spm_path='{tmp}/empty.model': {tmp}/empty.model is empty. Fix: give a "
                  '.model file written by SentencePiece with --pad_id=0 --eos_id=1 --unk_id=2 '
                  "--bos_id=-1, or '' to train one locally.")),
    Case("tokenizer", "`data.spm_path` with SentencePiece's default ids (unk 0, bos 1, eos 2)",
         lambda c: validate(**{"data.spm_path": _spm_model(c, "default_ids.model")})(c),
         message=("data.spm_path='{tmp}/default_ids.model': {tmp}/default_ids.model: the "
                  "SentencePiece model's (pad, eos, unk, bos) ids are (-1, 2, 0, 1), switchjax "
                  "needs T5's (0, 1, 2, none). Fix: give a .model file written by SentencePiece "
                  "with --pad_id=0 --eos_id=1 --unk_id=2 --bos_id=-1, or '' to train one locally.")),
    Case("tokenizer", "a corrupt cached SentencePiece model in data_dir", _corrupt_cached_spm,
         message=(("data.data_dir='{tmp}/data_spm': "
                   '{tmp}/data_spm/switchjax_spm/embedded_{corpus}-train-512.model is not a '
                   'SentencePiece model (it does not parse). Fix: delete '
                   '{tmp}/data_spm/switchjax_spm/embedded_{corpus}-train-512.model (the next run '
                   'trains it again).'))),
    Case("tokenizer", "`model.vocab_size=256` (the tokenizer has 532 ids)",
         validate_run(**{"model.vocab_size": 256}),
         message=("model.vocab_size=256: is smaller than the tokenizer's 532 ids (512 "
                  'SentencePiece pieces + data.num_extra_ids=20). Fix: set model.vocab_size >= '
                  '532.')),
    # Checkpoint directories.
    Case("checkpoint", "`--workdir` inside a regular file", _workdir_in_a_file,
         message=("--workdir='{tmp}/a_file/run': cannot be created or written: Not a directory. "
                  'Fix: use a writable run directory.')),
    Case("checkpoint", "newest checkpoint: `state/_METADATA` truncated (a warning; step 2 is "
         "restored, step 4 set aside)", _truncated_metadata,
         message=('Checkpoint step 4 in {tmp}/runs/truncated/checkpoints is corrupt: '
                  'state/_METADATA is not valid JSON (1000 bytes; Unterminated string starting '
                  'at, character 997): truncated or overwritten; trying the previous one.')),
    Case("checkpoint", "newest checkpoint without its `data/` directory (a warning; set aside)",
         _missing_item,
         message=('Checkpoint step 4 in {tmp}/runs/missing_item/checkpoints is incomplete: its '
                  'data/ directory is missing; trying the previous one.')),
    Case("checkpoint", "every checkpoint without its `state/` directory", _all_incomplete,
         message=("checkpoint='{tmp}/runs/all_incomplete/checkpoints': every checkpoint in it is "
                  'incomplete or corrupt (step 4: its state/ directory is missing; step 2: its '
                  'state/ directory is missing); they were moved to '
                  '{tmp}/runs/all_incomplete/checkpoints_bad. Fix: rerun the same command to '
                  'train from step 0, or put back a good copy of a checkpoint.')),
    Case("checkpoint", "the storage refuses to read the newest checkpoint (EIO)", _io_error,
         message=("checkpoint='{tmp}/runs/io_error/checkpoints/4': cannot be read: Input/output "
                  'error (OSError: [Errno 5] Input/output error: '
                  "'{tmp}/runs/io_error/checkpoints/4'). Nothing was moved (this is no evidence "
                  'that the checkpoint is bad). Fix: if the storage refused the read, make it '
                  'readable and rerun; if the arrays do not fit the model, rerun with the config '
                  'they were written with or use a new --workdir.')),
    Case("checkpoint", "checkpoints whose arrays do not fit the model", _wrong_shapes,
         message=(("checkpoint='{tmp}/runs/wrong_shapes/checkpoints/4': cannot be read: "
                   'ValueError: Requested shape: (552, 32) is not compatible with the stored '
                   'shape: (544, 32). Nothing was moved (this is no evidence that the checkpoint '
                   'is bad). Fix: if the storage refused the read, make it readable and rerun; if '
                   'the arrays do not fit the model, rerun with the config they were written with '
                   'or use a new --workdir.'))),
    Case("checkpoint", "the disk fills up while checkpoint step 4 is written (ENOSPC)",
         _disk_full,
         message=("checkpoint='{tmp}/runs/disk_full/checkpoints/4': could not be written: No "
                  "space left on device; the newest complete checkpoint, step 2, is intact. "
                  "Fix: free space on that disk or make the directory writable (or use a "
                  "--workdir elsewhere), then rerun the same command: it resumes from step 2.")),
    Case("checkpoint", "`--workdir` holding checkpoints of another config", _another_config,
         message=("--workdir='{tmp}/runs/another_config': holds checkpoints of another config: "
                  'moe.capacity_factor_train: 1.25 -> 0.5. Fix: rerun with the values they were '
                  'written with, or use a new --workdir (a resumed run may change only '
                  'train.num_train_steps, train.log_every, train.eval_every, train.eval_steps, '
                  'train.exact_match_examples, train.checkpoint_every, train.max_to_keep, '
                  'mesh.*, data.data_dir, data.num_workers, moe.expert_kernel).')),
    Case("checkpoint", "`inspect --step 3` (no such checkpoint)",
         lambda c: _read_state(c, 3),
         message=('--step=3: no such checkpoint in {tmp}/runs/read_state/checkpoints. Fix: use '
                  'one of [2, 4], or leave it out for the newest.')),
    Case("checkpoint", "`inspect --workdir` without checkpoints", lambda c: _read_state(c),
         message=("--workdir='{tmp}/no_checkpoints': {tmp}/no_checkpoints/checkpoints holds no "
                  'checkpoint. Fix: use the workdir of a run that saved one '
                  '(train.checkpoint_every, or the end).')),
    # Starting from a checkpoint (train.init_from).
    Case("init_from", "`train.init_from` that does not exist",
         validate(**{"train.init_from": "{tmp}/nowhere"}),
         message=("train.init_from='{tmp}/nowhere': does not exist. Fix: give a directory "
                  "written by experiments/convert_hf.py, a run's workdir, or "
                  "WORKDIR/checkpoints/STEP.")),
    Case("init_from", "`train.init_from` a directory without a checkpoint",
         validate(**{"train.init_from": "{tmp}"}),
         message=("train.init_from='{tmp}': holds no checkpoint (neither config.json and "
                  "params/ of experiments/convert_hf.py nor the checkpoints/ of a run). Fix: "
                  "give a directory written by experiments/convert_hf.py, a run's workdir, or "
                  "WORKDIR/checkpoints/STEP.")),
    Case("init_from", "`train.init_from` a run whose only checkpoint is incomplete",
         init_from("incomplete"),
         message=("train.init_from='{tmp}/incomplete': holds no complete checkpoint "
                  "({tmp}/incomplete/checkpoints has steps [3], all incomplete). Fix: use the "
                  "workdir of a run that saved a checkpoint (train.checkpoint_every, or the "
                  "end), or a directory written by experiments/convert_hf.py.")),
    Case("init_from", "`train.init_from` a checkpoint of another architecture",
         init_from("other", {"model.d_model": 48, "model.vocab_size": 600}),
         message=("train.init_from='{tmp}/converted/other': holds a model of another "
                  "architecture: model.d_model: 48 in the checkpoint, 32 in the config; "
                  "model.vocab_size: 600 in the checkpoint, 544 in the config. Fix: set these "
                  "fields to the checkpoint's values, or train.init_config='checkpoint' to "
                  "take them from it.")),
    Case("init_from", "`train.upcycle=True` from a sparse checkpoint",
         init_from("sparse", {}, **{"train.upcycle": True}),
         message=("train.init_from='{tmp}/converted/sparse': holds a sparse model (sparse FFNs "
                  "at encoder layer 1, decoder layer 1); upcycling copies dense FFNs into "
                  "experts. Fix: init from a dense checkpoint, or set train.upcycle=False to "
                  "continue the sparse model as it is.")),
    Case("init_from", "`train.upcycle=True` into a model without sparse layers",
         init_from("dense", {"model.encoder_moe_layers": "none",
                             "model.decoder_moe_layers": "none"},
                   **{"train.upcycle": True, "model.encoder_moe_layers": "none",
                      "model.decoder_moe_layers": "none"}),
         message=("train.upcycle=True: the configured model has no sparse layer to upcycle "
                  "into. Fix: set model.encoder_moe_layers / model.decoder_moe_layers (e.g. "
                  "'every_other'), or train.upcycle=False.")),
    Case("init_from", "`train.init_from` a checkpoint of 300 ids whose tokenizer has 420",
         init_from("small_vocab", {"model.vocab_size": 300}, everything=True,
                   **{"train.init_config": "checkpoint"}),
         message=("model.vocab_size=300: is smaller than the tokenizer's 420 ids (400 "
                  "SentencePiece pieces + data.num_extra_ids=20). Fix: use a tokenizer of at "
                  "most 300 ids (data.spm_path, data.num_extra_ids): the checkpoint of "
                  "train.init_from fixes the vocabulary.")),
    # Conversion.
    Case("conversion", "`--model` directory that does not exist", convert("missing"),
         message=("--model='{tmp}/hf/missing': no such directory. Fix: pass the directory "
                  'written by save_pretrained, or a hub name such as google/switch-base-8.')),
    Case("conversion", "`--model` directory without config.json", convert("no_config"),
         message=("--model='{tmp}/hf/no_config': the directory has no config.json. Fix: pass the "
                  'directory written by save_pretrained (config.json and the weights).')),
    Case("conversion", "config.json that is not JSON", convert("not_json", raw="{\"model_"),
         message=("--model='{tmp}/hf/not_json': {tmp}/hf/not_json/config.json is not valid JSON "
                  '(Unterminated string starting at: line 1 column 2 (char 1)). Fix: pass an '
                  'intact checkpoint directory.')),
    Case("conversion", "config.json of a T5 model", convert(
        "t5", {**SWITCH_CONFIG, "model_type": "t5"}),
         message=("config.json:model_type='t5': not a SwitchTransformers checkpoint (model_type "
                  "'switch_transformers'). Fix: convert a google/switch-* checkpoint.")),
    Case("conversion", "config.json without `expert_capacity`", convert(
        "no_capacity", _without("expert_capacity")),
         message=('config.json:expert_capacity=None: missing. Fix: a SwitchTransformers '
                  "config.json has all of ['vocab_size', 'd_model', 'd_ff', 'num_heads', 'd_kv', "
                  "'num_layers', 'num_experts', 'expert_capacity'].")),
    Case("conversion", "config.json with `router_bias: true`", convert(
        "bias", {**SWITCH_CONFIG, "router_bias": True}),
         message=('config.json:router_bias=True: switchjax routers have no bias; converting '
                  'would change routing. Fix: convert an unmodified google/switch-* checkpoint.')),
    Case("conversion", "config.json with `dense_act_fn: 'silu'`", convert(
        "silu", {**SWITCH_CONFIG, "dense_act_fn": "silu"}),
         message=("config.json:dense_act_fn='silu': no exact switchjax equivalent. Fix: use one "
                  "of ['relu', 'gelu_new', 'gelu_pytorch_tanh'].")),
    Case("conversion", "`--out` already holding converted params", _out_exists,
         message=("--out='{tmp}/hf_out/done': already holds converted params. Fix: pass "
                  '--overwrite (overwrite=True) or choose another directory.')),
    # Command-line flags (python -m ...: exit status 2, one line, no traceback).
    Case("command line", "`train --config.train.num_train_step=5`",
         argv=(*TRAIN, "--workdir={tmp}/cli", "--config.train.num_train_step=5"),
         message=('error: --config.train.num_train_step=5: the config has no field '
                  '\'num_train_step\' (Did you mean "num_train_steps"?). Fix: check the spelling '
                  '(--helpfull lists the flags).')),
    Case("command line", "`train --config.train.batch_size=x`",
         argv=(*TRAIN, "--workdir={tmp}/cli", "--config.train.batch_size=x"),
         message=("error: --config.train.batch_size='x': invalid literal for int() with base 10: "
                  "'x'. Fix: give a value of the flag's type (--helpfull lists the flags).")),
    Case("command line", "`train --config configs/nonexistent.py`",
         argv=("experiments.train", "--config", "configs/nonexistent.py",
               "--workdir={tmp}/cli"),
         message=("error: --config='configs/nonexistent.py': cannot be loaded (No such file or "
                  'directory). Fix: pass an existing configs/X.py[:arg].')),
    Case("command line", "`train --config configs/cpu_base.py:smok`",
         argv=("experiments.train", "--config", "configs/cpu_base.py:smok",
               "--workdir={tmp}/cli"),
         message=("error: config argument='smok': is unknown. Fix: use one of ['smoke'], e.g. "
                  'configs/X.py:smoke.')),
    Case("command line", "`train --config.model.init_scale=-1`",
         argv=(*TRAIN, "--workdir={tmp}/cli", "--config.model.init_scale=-1"),
         message=('error: model.init_scale=-1.0: must be > 0 (the standard deviation of the '
                  "dense weights' truncated-normal init is init_scale / sqrt(fan_in)). Fix: use "
                  '1.0 (T5) or 0.1 (the Switch paper).')),
    Case("command line", "`train --workdir` a read-only directory",
         argv=(*TRAIN, "--workdir={tmp}/read_only"), unprivileged=True,
         message=("error: --workdir='{tmp}/read_only': cannot be created or written: Permission "
                  'denied. Fix: use a writable run directory.')),
    Case("command line", "`sweep --config` a config without `sweep()`",
         argv=("experiments.sweep", "--config", "configs/cpu_base.py:smoke",
               "--workdir={tmp}/cli_sweep"),
         message=("error: --config='configs/cpu_base.py': defines no sweep(). Fix: add `def "
                  "sweep(): return [{'field': value}, ...]`, or run it with experiments/train.py.")),
    Case("command line", "`aot_compile --mesh 2,2`",
         argv=("experiments.aot_compile", "--mesh", "2,2"),
         message=("error: --mesh='2,2': expected three sizes data,expert,model (a size, -1 for "
                  "the rest). Fix: e.g. 1,8,1 or -1,8,1.")),
    Case("command line", "`inspect --workdir` a directory that is not a run",
         argv=("experiments.inspect", "--workdir", "{tmp}", "--text", "x"),
         message=("error: --workdir='{tmp}': is not a run directory ({tmp}/config.json does not "
                  'exist). Fix: pass the --workdir of a run trained with experiments/train.py.')),
    Case("command line", "`convert_hf --model` a directory that does not exist",
         argv=("experiments.convert_hf", "--model", "{tmp}/nonexistent",
               "--out", "{tmp}/converted"),
         message=("error: --model='{tmp}/nonexistent': no such directory. Fix: pass the "
                  'directory written by save_pretrained, or a hub name such as '
                  'google/switch-base-8.')),
    Case("command line", "`benchmark --sections bogus`",
         argv=("experiments.benchmark", "--out", "{tmp}/bench", "--sections", "bogus"),
         message=("error: --sections='bogus': unknown sections ['bogus']. Fix: use a "
                  "comma-separated subset of layer,model,scaling,ep,capacity.")),
]


# ----------------------------------------------------------------------------- running


def _run_cli(case: Case, ctx: Ctx) -> tuple[int, str]:
    argv = [a.format(**ctx.subs) for a in case.argv]
    if case.unprivileged:
        os.makedirs(ctx.path("read_only"), exist_ok=True)
        os.chmod(ctx.path("read_only"), 0o555)
    base = cli_args(tiny_config()) if argv[0] in ("experiments.train", "experiments.sweep") \
        and "configs/cpu_base.py:smoke" in argv else []
    prefix = unprivileged() if case.unprivileged else []
    result = subprocess.run([*prefix, sys.executable, "-m", *argv, *base], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


def _cli_message(status: int, stderr: str) -> str:
    assert status == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") or ": error: " in last, stderr[-3000:]
    return last


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Ctx(str(tmp_path_factory.mktemp("errors")))


@pytest.fixture(scope="module")
def cli_results(ctx):
    """The command-line rows, run at once (three at a time)."""
    rows = [c for c in CASES if c.argv]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda c: _run_cli(c, ctx), rows))
    return {c.bad_input: r for c, r in zip(rows, results)}


def actual_message(case: Case, ctx: Ctx, cli_results=None) -> str:
    if case.argv:
        status, stderr = (cli_results[case.bad_input] if cli_results is not None
                          else _run_cli(case, ctx))
        return _cli_message(status, stderr)
    return case.run(ctx)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}: {c.bad_input}" for c in CASES])
def test_bad_input_gets_its_message(case, ctx, request):
    results = request.getfixturevalue("cli_results") if case.argv else None
    assert ctx.placeholders(actual_message(case, ctx, results)) == case.message


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table() -> str:
    lines = [BEGIN, "", "| # | kind | bad input | message |", "|---|---|---|---|"]
    for i, case in enumerate(CASES, 1):
        tick = "``" if "`" in case.message else "`"
        lines.append(f"| {i} | {case.kind} | {_cell(case.bad_input)} | "
                     f"{tick} {_cell(case.message)} {tick} |")
    return "\n".join(lines + ["", END])


def test_docs_table_is_current():
    assert len(CASES) >= 40
    assert all(c.message for c in CASES)
    with open(DOC) as f:
        doc = f.read()
    assert render_table() in doc, "docs/errors.md is stale: run python tests/test_errors.py --write"


def _main(argv):
    import tempfile
    if "--write" in argv:
        with open(DOC) as f:
            doc = f.read()
        start, end = doc.index(BEGIN), doc.index(END) + len(END)
        with open(DOC, "w") as f:
            f.write(doc[:start] + render_table() + doc[end:])
        print(f"wrote {DOC}")
        return
    ctx = Ctx(tempfile.mkdtemp(prefix="switchjax_errors_"))
    only = [a for a in argv if not a.startswith("-")]
    for i, case in enumerate(CASES, 1):
        if only and str(i) not in only:
            continue
        try:
            got = ctx.placeholders(actual_message(case, ctx))
        except Exception as e:  # noqa: BLE001 - printed for the developer
            got = f"FAILED: {type(e).__name__}: {e}"
        mark = "ok " if got == case.message else "NEW"
        print(f"{mark} {i} [{case.kind}] {case.bad_input}\n    {got}", flush=True)


if __name__ == "__main__":
    import conftest  # noqa: F401  (8 host devices, as under pytest)
    _main(sys.argv[1:])
