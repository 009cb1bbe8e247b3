"""Every config field, commented, with its default. Recipes (quickstart.py, shakespeare_char.py, …)
start from `get_config()` here and change only what their recipe names."""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    # Architecture (gpt_jax/models/registry.py): gpt (decoder-only Transformer) | lstm (stacked
    # LSTM language model) | seq2seq (encoder–decoder Transformer over source/target pairs).
    m.arch = "gpt"
    m.num_layers = 4  # Transformer blocks.
    m.num_heads = 4  # Attention heads; must divide d_model.
    m.d_model = 128  # Residual stream width.
    m.mlp_ratio = 4  # MLP hidden width = mlp_ratio · d_model (model.mlp_dim overrides it).
    # MLP hidden width F; None → mlp_ratio · d_model, or for swiglu ⅔ of that (its three matrices
    # then hold as many parameters as two) rounded up to a multiple of model.mlp_multiple (Llama).
    m.mlp_dim = config_dict.placeholder(int)
    m.mlp_multiple = 256  # swiglu's default width rounds up to this (Llama's multiple_of).
    # Feed-forward: gelu (fc → model.activation → proj; GPT-2) | swiglu (proj(silu(gate) · fc);
    # Llama) | relu2 (fc → relu² → proj; Primer, modded-nanogpt).
    m.mlp = "gelu"
    m.norm = "layernorm"  # layernorm (GPT-2) | rmsnorm (Llama: no mean, no bias).
    # Token positions: learned (a table added to the embeddings; GPT-2) | sinusoidal (fixed sines
    # added to the embeddings; Vaswani et al.) | rope (rotary, on queries and keys; Llama) | alibi
    # (per-head linear biases on attention scores; Press et al.) | none (NoPE: causal masking
    # alone). All but learned run at lengths beyond the training length.
    m.positions = "learned"
    m.rope_theta = 10000.0  # RoPE base: frequencies theta^(-2i/head_dim).
    # Multiply the token embeddings by √d_model on input (Vaswani et al.; the LM head's tied use is
    # unscaled). With sinusoidal positions, whose amplitude is 1, it keeps tokens from being
    # drowned out by positions at GPT-2's 0.02 init.
    m.scale_embeddings = False
    # Key/value heads (grouped-query attention: each serves num_heads / num_kv_heads query heads;
    # 1 = multi-query); None → num_heads (multi-head). The KV cache holds only these.
    m.num_kv_heads = config_dict.placeholder(int)
    m.qk_norm = False  # RMS-normalise queries and keys per head before positions (OLMo 2, Qwen3).
    # Attention scores: dot_product (q·k/√H) | additive (Bahdanau: vᵀ tanh(W_q q + W_k k) per
    # head; memory [B, chunk, T, N, H] per layer, see model.additive_chunk).
    m.attention = "dot_product"
    m.additive_chunk = 64  # Additive attention scores this many queries at a time (memory bound).
    m.logit_softcap = 0.0  # Logits → c·tanh(logits / c) (Gemma 2); 0 = off.
    m.max_seq_len = config_dict.placeholder(int)  # Learned positions; None → data.seq_len.
    m.vocab_size = config_dict.placeholder(int)  # None → the tokenizer's vocabulary size.
    m.vocab_multiple = 1  # Pad the vocab up to a multiple (64 pays on GPUs; padded ids are masked).
    m.dropout = 0.0  # Dropout on embeddings and residual branches.
    m.attention_dropout = 0.0  # Dropout on attention weights (> 0 uses the explicit-weights path).
    m.bias = False  # Biases in Dense layers and LayerNorms (GPT-2: True; nanoGPT recipes: False).
    m.tie_embeddings = True  # LM head shares the token embedding matrix.
    m.activation = "gelu"  # MLP activation: gelu (exact erf, nanoGPT) | gelu_tanh (GPT-2) | relu.
    m.norm_eps = 1e-5  # LayerNorm / RMSNorm epsilon (also qk_norm's).
    m.init_std = 0.02  # GPT-2 init std; residual projections get init_std / sqrt(2·num_layers).
    m.dtype = "float32"  # Compute dtype: float32 | bfloat16 (params stay float32).
    # jax.nn.dot_product_attention implementation: auto (cuDNN flash attention on CUDA GPUs for
    # bfloat16 with head_dim a multiple of 8 ≤ 128, else XLA) | xla | cudnn.
    m.attention_impl = "auto"
    # Rematerialisation of each block in the backward pass (memory for compute): none | full
    # (keep only block inputs) | dots_saveable (keep matmul outputs) | dots_with_no_batch_dims_saveable.
    m.remat = "none"
    # Run the blocks under nn.scan: compile time stays flat in depth; parameters are stacked on a
    # leading `layers` axis (params/h/...), so checkpoints do not mix with unrolled ones (h_0 …).
    m.scan_layers = False
    # model.arch=lstm: the LSTM's hidden (and cell) width; None → d_model. num_layers stacks
    # cells, model.dropout acts on the embeddings, between layers and on the output, and a tied
    # head projects a hidden width ≠ d_model back to d_model first. Its embeddings start N(0, 1);
    # init_std sets the projection and an untied head (gpt_jax/models/lstm.py says why).
    m.lstm_hidden = config_dict.placeholder(int)
    # model.arch=seq2seq: encoder blocks; None → num_layers (the decoder's blocks).
    m.encoder_layers = config_dict.placeholder(int)
    # model.arch=seq2seq: pre (norm before each sublayer, a final norm; stable, the default) |
    # post (norm after each residual add, as in "Attention is all you need").
    m.norm_position = "pre"
    # model.arch=seq2seq: one token embedding table for source and target (their vocabulary is
    # one tokenizer's); False gives the encoder a table of its own.
    m.share_embeddings = True
    # model.arch=seq2seq: learned source positions; None → data.source_len.
    m.max_source_len = config_dict.placeholder(int)

    c.data = d = ml_collections.ConfigDict()
    d.corpus = "pystdlib"  # Named corpus: pystdlib (offline) | shakespeare (downloaded once).
    d.path = config_dict.placeholder(str)  # A local text file or folder, used instead of corpus.
    # A folder made by `python -m gpt_jax.data.prepare --out=DIR`, used instead of corpus and path;
    # several, comma-separated, are mixed by data.mixture_weights (val/loss is the first folder's).
    # The folder's tokenizer, vocabulary and train/val split are the run's: data.tokenizer,
    # data.vocab_size and data.val_fraction are not used. None → prepare corpus/path in process.
    d.prepared = config_dict.placeholder(str)
    # Check every shard of the prepared data against its sha256 in meta.json when the run opens
    # it, naming a changed shard. Hashing costs a full read of the data at every start (and
    # resume); sizes are always checked, which catches missing and truncated shards.
    d.verify_shards = False
    # With several data.prepared folders: their weights, comma-separated floats (e.g. "0.7,0.3"),
    # normalised; "" → proportional to each folder's train tokens (as if concatenated).
    d.mixture_weights = ""
    # byte | char (vocab built from the corpus) | bpe (trained on the corpus) | gpt2 (tiktoken's)
    # | hf:PATH (a Hugging Face tokenizer.json). With data.prepared, the folder's tokenizer is used.
    d.tokenizer = "byte"
    d.vocab_size = 4096  # bpe's vocabulary (EOT included) when it is trained on corpus/path here.
    # Attention stays inside a document: a token attends only to its own document's tokens up to
    # itself (documents end at the tokenizer's end-of-text token, so it needs one: bpe, gpt2,
    # or an hf: tokenizer that has one). Positions stay absolute (the row's, not the document's).
    # The mask runs on XLA's attention (model.attention_impl=auto then skips cuDNN's).
    d.document_mask = False
    d.cache_dir = "~/.cache/gpt_jax"  # Downloads and prepared token files, shared between runs.
    d.val_fraction = 0.1  # The last 10% of the token stream validates (nanoGPT's split).
    d.seq_len = 128  # Tokens per training sequence (T).
    # Training windows: epochs (shuffled non-overlapping windows, every token once per epoch) |
    # random (uniform random starts with replacement, nanoGPT's get_batch).
    d.sampling = "epochs"
    d.num_threads = 2  # Grain reader threads.
    d.prefetch = 4  # Batches Grain prepares ahead of the device.
    # Sequence pairs (model.arch=seq2seq): data.path is a JSONL file of objects with these two
    # text fields, data.prepared a folder `python -m gpt_jax.data.prepare --pairs` made, or
    # data.task a built-in offline task (gpt_jax/data/tasks.py): addition | sort | docsig.
    d.source_field = "source"
    d.target_field = "target"
    d.task = config_dict.placeholder(str)
    # Train examples a built-in task draws; it holds out a tenth as many (at least 100) for val.
    d.task_examples = 20000
    d.task_seed = 0  # Seed of the built-in task's examples (not of training).
    # Source tokens per example: longer sources are cut to this (counted in the log).
    d.source_len = 64
    # Supervised fine-tuning (a folder `python -m gpt_jax.data.prepare --sft` made, named by
    # data.prepared): padded (one example per row, cut to data.seq_len + 1 tokens, the rest
    # padding of weight 0) | packed (whole examples one after another in a row, each attending
    # only to itself, positions counted from each example's start; the rest padding).
    d.sft_packing = "padded"

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-3  # Peak learning rate (AdamW).
    o.min_lr = 1e-4  # Learning rate at the end of the cosine decay.
    o.warmup_steps = 100  # Linear warmup from 0.
    o.decay_steps = config_dict.placeholder(int)  # Cosine decay ends here; None → train.num_steps.
    o.beta1 = 0.9
    o.beta2 = 0.99
    o.eps = 1e-8
    o.weight_decay = 0.1  # Decoupled weight decay, applied to matrices only (not biases/norms).
    o.grad_clip = 1.0  # Global-norm clipping threshold; 0 disables.

    c.train = t = ml_collections.ConfigDict()
    t.num_steps = 1000  # Optimizer steps.
    t.batch_size = 16  # Global batch, in sequences.
    t.grad_accum_steps = 1  # Micro-batches per step (batch_size must divide evenly).
    t.seed = 0  # Seeds init, dropout and data order.
    # Cross-entropy over chunks of this many positions (0 = all at once): the LM head's float32
    # logits then exist for one chunk at a time (recomputed in the backward pass), which matters
    # when batch × seq_len × vocab is large (GPT-2: 50k vocab). Must divide data.seq_len.
    t.loss_chunk = 0
    # z-loss (PaLM): adds z_loss · log²Z per token to the training loss (Z: the softmax
    # normaliser, kept near 1 for stability); train/loss includes it, val/loss is the plain
    # cross-entropy. 0 = off.
    t.z_loss = 0.0
    t.eval_every = 250  # Steps between evaluations.
    t.eval_batches = 20  # Fixed val batches per periodic evaluation.
    # model.arch=seq2seq: val examples decoded (greedy) at each evaluation for token accuracy,
    # exact match, BLEU and chrF (sacrebleu); all of them at a full final eval. 0 = none.
    t.eval_decode = 500
    t.final_eval = "full"  # At the end: full (every val token, exact) | batches | none.
    # Tasks scored by log-likelihood at every evaluation, logged as tasks/NAME/acc, acc_norm or
    # exact_match (+ _stderr): comma-separated task JSONL files or built-in names
    # (gpt_jax/eval/tasks.py, builtin_tasks.py). "" = none. Language models only.
    t.eval_tasks = ""
    t.eval_tasks_fewshot = 0  # Train examples in each task prompt (k-shot).
    t.eval_tasks_limit = 200  # Test examples scored per task at each evaluation (0 = all).
    t.eval_tasks_source = ""  # The text a built-in task is made from, where it needs one.
    # A non-finite loss or gradient: stop (a message naming the step; checkpoints untouched) |
    # skip (that update is dropped; train/nonfinite_steps counts them).
    t.on_nonfinite = "stop"
    # Progressive stacking (Gong et al. 2019): steps after which the model grows, comma-separated
    # ascending (e.g. "500,1000"); "" = never. Each growth multiplies the depth by
    # train.grow_factor, so the run starts at model.num_layers / grow_factor^(number of growths)
    # layers and ends at model.num_layers (which must divide evenly).
    t.grow_at = ""
    t.grow_factor = 2  # Depth multiplier at each growth.
    # How the grown model's layers copy the trained ones: stacked (1..L, then 1..L again) |
    # interleaved (each layer repeated grow_factor times in place).
    t.grow_mode = "stacked"
    # The optimizer state of the copied parameters: carry (each copy takes its source's Adam
    # moments) | reset (zero moments and Adam's count for every parameter, as at a fresh start;
    # the step count and lr schedule go on).
    t.grow_optimizer = "carry"
    # What a repeated layer starts as: preserve (a copy whose residual outputs, attn/out and
    # mlp/proj, are zero, so the grown model computes exactly the trained one's function: no
    # loss spike; Shen et al. 2022) | copy (a full copy, Gong et al. 2019: another function, the
    # loss jumps at the growth and recovers over some steps).
    t.grow_init = "preserve"
    # Keep XLA:CPU temporaries in glibc's heap between steps (~30% faster small CPU models; see
    # gpt_jax/training/allocator.py). Off if host memory is tight.
    t.tune_host_malloc = True
    # Before the first step, compare the compiled train step's memory (XLA's analysis) with what
    # the devices have (host RAM on CPU) and stop with one line if it cannot fit. False skips it.
    t.memory_check = True

    # Device mesh: axes data (batch split, params replicated), fsdp (batch split, params and
    # optimizer state sharded), tensor (Megatron-style: heads / MLP / vocab split). The sizes must
    # multiply to the device count; -1 takes all remaining devices (data's default -1 yields to
    # an explicit -1 on fsdp or tensor). See docs/scaling.md.
    c.mesh = mh = ml_collections.ConfigDict()
    mh.data = -1
    mh.fsdp = 1
    mh.tensor = 1
    # Across nodes or slices (DCN): each mesh axis is dcn_<axis> × <axis>, the dcn_ factor spanning
    # nodes (processes on GPUs, slices on TPUs) and the other the devices within one. 1 = one node.
    mh.dcn_data = 1
    mh.dcn_fsdp = 1
    mh.dcn_tensor = 1
    # Logical axis → mesh axes (comma-separated; empty = replicated). Parameters and activations
    # name logical axes; these rules alone decide the parallelism. `batch` is resolved first, so
    # an activation's embed dimension stays whole when batch takes fsdp. A dimension a mesh axis
    # does not divide is kept whole on that axis (logged for parameters).
    mh.rules = r = ml_collections.ConfigDict()
    r.batch = "data,fsdp"
    r.length = ""
    r.embed = "fsdp"
    r.heads = "tensor"
    r.kv = ""
    r.mlp = "tensor"
    r.vocab = "tensor"
    r.norm = ""
    r.layers = ""  # The stacked-layers axis of scan_layers parameters.
    # Multi-process (several hosts, or tools/launch_local.py): auto joins a distributed run when
    # one is configured (coordinator below or JAX_COORDINATOR_ADDRESS) or detected (SLURM with
    # several tasks, Open MPI, a multi-host TPU pod); on: always (JAX's own cluster detection);
    # off: single process.
    mh.distributed = "auto"
    mh.coordinator_address = config_dict.placeholder(str)  # host:port of process 0.
    mh.num_processes = config_dict.placeholder(int)
    mh.process_id = config_dict.placeholder(int)

    c.checkpoint = ck = ml_collections.ConfigDict()
    ck.every = 500  # Steps between (async) saves to WORKDIR/checkpoints; one more at the end.
    ck.keep = 3  # Newest checkpoints kept, plus the one with the lowest val loss.
    # auto: resume from the workdir's newest checkpoint, else start from scratch | scratch (refused
    # if the workdir has checkpoints) | a checkpoint folder or workdir to take parameters from
    # (also one made by `tools/convert_hf.py import`) | hf:PATH, a Hugging Face GPT-2 folder (or
    # hub name) or Llama folder, converted on the fly. A new run from parameters: no optimizer
    # state, step 0.
    ck.init_from = "auto"

    # Parameter-efficient fine-tuning of a GPT from checkpoint.init_from (gpt_jax/finetune/):
    # with LoRA or a soft prompt, only the adapters train; the base parameters stay frozen (no
    # gradients, no optimizer state) and checkpoints hold the adapters and a reference to the base.
    c.finetune = ft = ml_collections.ConfigDict()
    # LoRA (Hu et al. 2021) rank r; 0 = off. Each target projection W gains (alpha / r) · A B,
    # A [in, r] random, B [r, out] zero, so step 0 computes exactly the base model.
    ft.lora_rank = 0
    ft.lora_alpha = 16.0  # LoRA scale numerator: the update is (lora_alpha / lora_rank) · A B.
    # The projections LoRA adapts, comma-separated: q, k, v, out (attention), fc, gate, proj
    # (MLP; gate only with model.mlp=swiglu); "attention" and "mlp" name each group.
    ft.lora_targets = "attention,mlp"
    # Soft-prompt tuning (Lester et al. 2021): this many trainable embeddings before every
    # sequence, initialised from the embeddings of random vocabulary tokens; 0 = off.
    ft.prompt_tokens = 0
    # The checkpoint the adapters apply to (a step folder or hf:PATH). None → resolved from
    # checkpoint.init_from when the run starts and recorded, so a resume, sample and evaluate
    # find the same base even if its run has since saved newer checkpoints.
    ft.base = config_dict.placeholder(str)

    c.log = lg = ml_collections.ConfigDict()
    lg.every = 10  # Steps between train rows in metrics.jsonl / TensorBoard (and plain lines).
    # auto: a progress bar when stderr is a terminal, else a plain line per log.every steps (step,
    # loss, lr, tokens/s, MFU, elapsed, ETA: what a cluster log wants) | bar | lines.
    lg.progress = "auto"
    lg.tensorboard = True  # Write TensorBoard events to WORKDIR/tb (flushed at every row).
    # Also log every row to Weights & Biases (pip install -r requirements-wandb.txt): offline
    # (files under WORKDIR/wandb, no network; `wandb sync` uploads them) | online (needs a
    # login). A resumed run logs under its wandb run's id (kept in WORKDIR/wandb_id).
    lg.wandb = False
    lg.wandb_mode = "offline"
    lg.wandb_project = "gpt_jax"  # The wandb project the runs go to.
    # A workdir on cloud storage (gs://…): its metrics, TensorBoard events and config are written
    # locally and uploaded at most this often, before every checkpoint save and at the end (an
    # object cannot be appended to; see gpt_jax/training/remote.py). 0: at every row.
    lg.upload_every_s = 30.0
    lg.peak_flops = 0.0  # Peak FLOP/s per device for MFU; 0 → look up the device (None on CPU).

    c.sample = s = ml_collections.ConfigDict()
    s.num_samples = 1  # Samples printed at the end of training (0 disables).
    s.prompt = "\n"  # Prompt text for the end-of-training sample.
    s.max_new_tokens = 200
    s.temperature = 0.8
    s.top_k = 0  # 0 disables top-k filtering.
    s.top_p = 1.0  # Nucleus sampling: keep the smallest set of ids with this much mass (1 = off).
    s.seed = 0
    # model.arch=seq2seq: the end-of-training samples decode sample.num_samples val sources with
    # a beam search of this many beams (1 = greedy; sample.temperature does not apply) and this
    # length penalty α: hypotheses rank by log p / ((5 + length) / 6)^α (GNMT; 0 = none).
    s.beam_size = 1
    s.length_penalty = 0.6
    return c
