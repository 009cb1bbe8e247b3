"""Assembling a run: validated config → mesh → data → model (through the registry) → a sharded
state init and the jitted steps. What `loop.run` trains, and what tools/plan.py and
tools/benchmark.py compile without data."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from gpt_jax import config as config_lib
from gpt_jax.data import batch as batch_lib
from gpt_jax.data import corpora, pairs, prepare, sft, training_data
from gpt_jax.finetune import adapters
from gpt_jax.models import registry
from gpt_jax.parallel import distributed, sharding
from gpt_jax.parallel import mesh as mesh_lib
from gpt_jax.training import allocator, checkpoint, optim, remote, step


@dataclasses.dataclass
class Run:
    """What one training run is made of, built once by `setup`."""

    config: ml_collections.ConfigDict  # Resolved: vocab size and positions filled in.
    # Where the run writes its files: the workdir, or for a URL workdir its local mirror's folder
    # (set by loop.run on entering the mirror). None (and data None) from setup_without_data.
    workdir: pathlib.Path | None
    data: training_data.TrainingData | pairs.PairData | None
    model: nn.Module
    hparams: Any  # The model's hyperparameters (its architecture's frozen dataclass).
    mesh: jax.sharding.Mesh
    rules: sharding.Rules  # Logical axis → mesh axes (mesh.rules).
    init_state: Callable[[], step.TrainState]  # Jitted: a fresh state at step 0, already sharded.
    abstract_state: Any  # Shapes, dtypes and shardings of the state (restore, AOT lowering).
    state_shardings: Any
    mirror: remote.Mirror | None = None  # A URL workdir's local copy of its small files.
    # With adapters (gpt_jax/finetune/adapters.py): a tree of bools like the params, True where
    # a parameter trains; None = every parameter trains.
    trainable: Any = None

    @property
    def where(self) -> str:
        """The workdir as the user named it (the URL of a remote one), for messages."""
        return str(self.mirror.url if self.mirror else self.workdir)

    @property
    def checkpoints(self) -> Any:
        """WORKDIR/checkpoints: an etils.epath.Path for a URL workdir, else a pathlib.Path."""
        return checkpoint.checkpoint_dir(self.mirror.url if self.mirror else self.workdir)

    @property
    def arch(self) -> registry.Architecture:
        """The architecture model.arch names (FLOPs, shape fields, decoding, …)."""
        return registry.arch_of(self.hparams)


def check_batch_split(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                      rules: sharding.Rules) -> None:
    """Each micro-batch must split evenly over the mesh axes the batch is sharded on."""
    axes = dict(rules)["batch"] or ()
    shards = math.prod(mesh.shape[a] for a in axes)
    t = config.train
    micro = t.batch_size // t.grad_accum_steps
    if micro % shards:
        raise config_lib.ConfigError(
            f"train.batch_size={t.batch_size} / train.grad_accum_steps={t.grad_accum_steps} = "
            f"{micro} sequences per micro-batch do not split over the {shards} batch shards "
            f"({'×'.join(axes)} of mesh {mesh_lib.describe(mesh)}); make train.batch_size a "
            f"multiple of {t.grad_accum_steps * shards} or lower train.grad_accum_steps.")


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          devices: list[jax.Device] | None = None) -> Run:
    """Validates the config, joins a multi-process run, builds the mesh (over `devices`, default
    all), prepares the data, builds the model and the sharded state init."""
    config_lib.validate(config)
    if remote.is_url(workdir) and (problem := remote.url_problem(str(workdir), "--workdir")):
        raise config_lib.ConfigError(problem)
    if config.train.tune_host_malloc:
        allocator.tune_glibc_malloc()  # Before the first large allocation.
    distributed.initialize(config.mesh)  # Before anything touches a device.
    if not distributed.is_primary():
        logging.set_verbosity(logging.WARNING)  # Process 0 speaks for the run.
    mesh, rules = _mesh_and_rules(config, devices)
    data = load_data(config)
    try:
        if not isinstance(data, pairs.PairData):  # Pairs sample val sources instead.
            data.tokenizer.encode(config.sample.prompt)  # Fail now, not after training.
    except ValueError as e:
        raise config_lib.ConfigError(f"sample.prompt: {e}") from e
    mirror = None
    if remote.is_url(workdir):  # Its files are pulled into the mirror once the lock is held.
        mirror = remote.Mirror(str(workdir), config.log.upload_every_s)
        workdir = None
    else:
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    vocab_size = data.vocab_size if isinstance(data, pairs.PairData) else data.tokenizer.vocab_size
    r = _assemble(config, vocab_size, mesh, rules, workdir, data)
    r.mirror = mirror
    return r


def setup_without_data(config: ml_collections.ConfigDict) -> Run:
    """What `setup` builds (mesh over every device, model, sharded state init) without data or a
    workdir, for tools that only compile or time the step (plan, benchmark)."""
    config_lib.validate(config)
    mesh, rules = _mesh_and_rules(config, None)
    return _assemble(config, vocab_size_without_data(config), mesh, rules, None, None)


def _assemble(config, vocab_size: int, mesh, rules, workdir, data) -> Run:
    config, hparams = build_model(config, vocab_size)
    model = registry.build(hparams)
    init_state, abstract_state, state_sh = build_state(config, model, mesh, rules)
    return Run(config, workdir, data, model, hparams, mesh, rules, init_state, abstract_state,
               state_sh, trainable=adapters.trainable_mask(abstract_state.params, hparams))


def load_data(config: ml_collections.ConfigDict
              ) -> training_data.TrainingData | pairs.PairData | sft.SftData:
    """The run's data: the data.prepared folder(s), or data.corpus / data.path tokenized into
    the cache (by process 0; the others then read its files); for an architecture that reads
    sequence pairs, the pairs of data.prepared, data.task or data.path; an SFT folder
    (gpt_jax/data/sft.py) as data.prepared, its examples. Problems are ConfigErrors."""
    d = config.data
    if registry.get(config.model.arch).reads_pairs:
        return _load_pairs(config)
    folders = config_lib.prepared_folders(config)
    if any(sft.read_meta(f) is not None for f in folders):
        return _load_sft(config, folders)
    try:
        if folders:  # Already tokenized: every process only opens the files.
            data = training_data.open_folders(folders, config_lib.mixture_weights(config),
                                              verify=d.verify_shards)
            if d.tokenizer.partition(":")[0] != data.tokenizer.name:
                logging.info("data.prepared: the folder's tokenizer (%s, vocab %d) overrides "
                             "data.tokenizer=%r.", data.tokenizer.name, data.tokenizer.vocab_size,
                             d.tokenizer)
        else:
            folder = None
            cache_dir = str(pathlib.Path(d.cache_dir).expanduser())
            vocab_size = d.vocab_size if d.tokenizer == "bpe" else None
            for turn in ("primary", "others"):  # Process 0 tokenizes; the others read its files.
                if (turn == "primary") == distributed.is_primary():
                    corpus = corpora.load_corpus(d.corpus, d.path, cache_dir)
                    folder = prepare.prepare(corpus, d.tokenizer, cache_dir, d.val_fraction,
                                             vocab_size)
                distributed.barrier(f"prepared data: {turn}")
            assert folder is not None
            data = training_data.open_folders([str(folder)], None, verify=d.verify_shards)
    except (OSError, ValueError) as e:  # Missing path or folder, empty corpus, failed download.
        raise config_lib.ConfigError(str(e)) from e
    if d.document_mask and data.eot_id is None:
        raise config_lib.ConfigError(
            f"data.document_mask=True needs end-of-text tokens to find documents, and the data's "
            f"{data.tokenizer.name} tokenizer has none; prepare the data with --tokenizer=bpe or "
            "gpt2, or set data.document_mask=False.")
    return data


def _load_pairs(config: ml_collections.ConfigDict) -> pairs.PairData:
    d = config.data
    data = None
    try:
        for turn in ("primary", "others"):  # Process 0 prepares; the others read its folder.
            if (turn == "primary") == distributed.is_primary():
                data = pairs.load(d.task, d.path, d.prepared, d.tokenizer, d.cache_dir,
                                  d.val_fraction, d.task_examples, d.task_seed, d.source_field,
                                  d.target_field, d.vocab_size if d.tokenizer == "bpe" else None)
            distributed.barrier(f"prepared pairs: {turn}")
    except (OSError, ValueError) as e:
        raise config_lib.ConfigError(str(e)) from e
    assert data is not None
    logging.info("data: %s.", pairs.describe(data))
    return data


def _load_sft(config: ml_collections.ConfigDict, folders: list[str]) -> sft.SftData:
    if len(folders) > 1:
        raise config_lib.ConfigError(
            f"data.prepared={config.data.prepared!r} names several folders, one of them SFT "
            "data, which is read alone (no mixtures); give one folder.")
    if config.data.document_mask:
        raise config_lib.ConfigError(
            "data.document_mask=True masks documents in a token stream; an SFT folder's examples "
            "are kept apart by data.sft_packing=packed instead: set data.document_mask=False.")
    if config.finetune.prompt_tokens and config.data.sft_packing == "packed":
        raise config_lib.ConfigError(
            f"finetune.prompt_tokens={config.finetune.prompt_tokens}: a soft prompt serves one "
            "example per row, and data.sft_packing=packed puts several in a row; set "
            "data.sft_packing=padded.")
    try:
        data = sft.open_folder(folders[0])
    except (OSError, ValueError) as e:
        raise config_lib.ConfigError(str(e)) from e
    logging.info("data: %s.", sft.describe(data))
    return data


def _mesh_and_rules(config: ml_collections.ConfigDict,
                    devices: list[jax.Device] | None) -> tuple[jax.sharding.Mesh, sharding.Rules]:
    if warning := mesh_lib.unused_accelerator():
        logging.warning("%s", warning)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.mesh)
    check_batch_split(config, mesh, rules)
    return mesh, rules


def batch_sharding(r: Run) -> jax.sharding.NamedSharding:
    """The sharding of every [B, …] array of a batch dict: rows over the `batch` rule's axes.
    One sharding for the whole dict (a pytree prefix), so a batch may carry optional keys."""
    return sharding.batch_sharding(r.mesh, r.rules)


def abstract_batch(r: Run) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of one global training batch (for AOT lowering)."""
    B, T = r.config.train.batch_size, r.config.data.seq_len
    if r.arch.reads_pairs:
        spec = pairs.batch_spec(B, T, r.config.data.source_len)
    elif isinstance(r.data, sft.SftData):  # Packed rows add segment_ids and positions.
        spec = sft.batch_spec(B, T, r.config.data.sft_packing)
    else:
        spec = batch_lib.lm_batch_spec(B, T)
    batch_sh = batch_sharding(r)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
            for k, (shape, dtype) in spec.items()}


def vocab_size_without_data(config: ml_collections.ConfigDict) -> int:
    """model.vocab_size, else the first data.prepared folder's (its meta.json, where it can be
    read), else the tokenizer's where it does not depend on the corpus (byte 256, gpt2 50257):
    what tools that build the model without reading data (plan, benchmark) use."""
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    folders = config_lib.prepared_folders(config)
    if folders and (size := training_data.prepared_vocab_size(folders[0])) is not None:
        return size
    if config.data.tokenizer in training_data.FIXED_VOCAB_SIZES:
        size = training_data.FIXED_VOCAB_SIZES[config.data.tokenizer]
        # Sequence pairs add an end-of-sequence id to a tokenizer without one (pairs.py).
        extra = registry.get(config.model.arch).reads_pairs and config.data.tokenizer == "byte"
        return size + int(extra)
    raise config_lib.ConfigError(
        f"the vocabulary of data.tokenizer={config.data.tokenizer!r} depends on the corpus; set "
        "--config.model.vocab_size (or data.prepared to a prepared folder) to build the model "
        "without preparing data.")


def build_model(config: ml_collections.ConfigDict,
                vocab_size: int) -> tuple[ml_collections.ConfigDict, Any]:
    """The config with model.vocab_size and model.max_seq_len filled in (for a tokenizer of
    `vocab_size`), and the hyperparameters of its model.arch."""
    config = registry.resolve(config, vocab_size)
    return config, registry.hyperparameters(config)


def build_state(config: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh,
                rules: sharding.Rules) -> tuple[Callable[[], step.TrainState], Any, Any]:
    """(init_state, abstract_state, state_shardings): a jitted init that creates the state
    already sharded (no device ever holds all of it), its shapes with shardings (for restoring
    and AOT lowering, nothing allocated), and the shardings."""
    init_key, dropout_key = jax.random.split(jax.random.key(config.train.seed))
    tx = optim.make_optimizer(config)

    def init_params():  # Parameters boxed with their logical axis names.
        tokens_BT = jnp.zeros((1, config.data.seq_len), jnp.int32)
        source = {}
        if registry.arch_of(model.cfg).reads_pairs:
            shape = (1, config.data.source_len)
            source = {"source_BS": jnp.zeros(shape, jnp.int32),
                      "source_mask_BS": jnp.ones(shape, jnp.int32)}
        return model.init(init_key, tokens_BT, deterministic=True, **source)["params"]

    def init() -> step.TrainState:  # The state holds plain arrays; the shardings say where.
        return step.new_train_state(model.apply, nn.meta.unbox(init_params()), tx, dropout_key)

    with sharding.activation_context(mesh, rules):
        param_sh = sharding.param_shardings(jax.eval_shape(init_params), mesh, rules)
        abstract = jax.eval_shape(init)
    state_sh = sharding.state_shardings(abstract, param_sh, mesh)
    init_state = jax.jit(init, out_shardings=state_sh)
    return init_state, sharding.with_shardings(abstract, state_sh), state_sh


def compile_steps(r: Run, eot_id: int | None = None) -> tuple[Callable, Callable]:
    """The jitted train step (state donated) and eval step: state placed per the rules, batches
    split over the batch axes, metrics replicated. With `eot_id` (data.document_mask), attention
    stays inside the documents that token ends."""
    config = r.config
    batch_sh = batch_sharding(r)
    replicated = jax.sharding.NamedSharding(r.mesh, jax.sharding.PartitionSpec())
    use_dropout = r.arch.uses_dropout(r.hparams)
    train_step = jax.jit(
        step.make_train_step(r.model, optim.make_schedule(config), config.train.grad_accum_steps,
                             use_dropout, config.train.loss_chunk, eot_id, config.train.z_loss,
                             r.trainable),
        in_shardings=(r.state_shardings, batch_sh),
        out_shardings=(r.state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(step.make_eval_step(r.model, config.train.loss_chunk, eot_id),
                        in_shardings=(r.state_shardings.params, batch_sh),
                        out_shardings=replicated)
    return train_step, eval_step
