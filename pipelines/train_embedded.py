"""Train the embedded pipeline's VAE and transformer on procedural clips of coloured shapes (CPU).

Run it from the repository root::

    python -m diffattn.pipelines.train_embedded                 # the shipped weights (105 min on 2 cores)
    python -m diffattn.pipelines.train_embedded --out /tmp/w --quick   # a tiny run, seconds

It writes ``<out>/vae/`` and ``<out>/transformer/`` (``save_pretrained`` folders: config.json +
diffusion_pytorch_model.safetensors) and ``<out>/training.json`` (settings, losses, times), and
draws the loss curves into ``--plot`` (PNG). ``build_embedded_wan_pipeline()`` loads the folders
shipped in ``diffattn/pipelines/embedded_weights/`` with ``from_pretrained``.

The stages (each with a progress bar; all data is drawn by :mod:`.shapes_data`, nothing is read):

1. **VAE** — an :class:`~diffusers.AutoencoderKLWan` (Wan 2.2-style: 2x2 pixel patchify, residual
   up/down blocks; 8x spatial and 4x temporal compression in all, 16 latent channels) trained as an
   autoencoder on random 9-frame crops of clips: L1 (weighted up on the objects' pixels) + a small
   KL term, posterior samples decoded so the decoder tolerates imperfect latents; then on crops of
   all 17 frames, so the later 4-frame chunks (decoded through the causal caches) come out right.
2. **Latents** — a fixed set of clips is encoded once (posterior means) at the generation size;
   these clips use the ``centred`` layout (objects near the middle, fewer pairs) on the ``dark``
   background, a narrower world that the tiny transformer learns in the time there is (the VAE sees
   the ``free`` layout on ``varied`` backgrounds, so it encodes objects anywhere on any of them);
   the per-channel mean and standard
   deviation of the latents go into the VAE config (``latents_mean`` / ``latents_std``, which
   ``WanPipeline`` uses to un-normalise before decoding). Prompts are encoded with the packaged
   MiniLM exactly as ``WanPipeline.encode_prompt`` does (``max_sequence_length`` 20, zero padding: the longest
   prompt of the grammar is 13 tokens).
3. **Transformer** — a :class:`~diffusers.WanTransformer3DModel` trained with rectified flow
   matching, as Wan is: ``x_t = (1 - s) x_0 + s e``, target ``e - x_0``, timestep ``1000 s``, with
   ``s`` drawn uniformly then shifted by ``flow_shift`` (3, the scheduler's) so the training
   noise levels match the sampling schedule; 10% of prompts replaced by the empty prompt (the
   pipeline's negative prompt) for classifier-free guidance; AdamW, warm-up then cosine decay,
   gradient clipping, an exponential moving average of the weights (saved). First on the first
   3 latent frames of each clip (its first 9 frames: a shorter sequence, cheaper steps, the same
   spatial scale), then on all 5.
4. **Transformer, second round** (``dit-more``) — a warm restart from the first round's weights
   (saved and loaded back): a fresh optimiser, warm-up and cosine schedule (peak ``more_lr``), the
   same two lengths, with ``more_threads`` torch threads (two: the stage runs alone on the machine).
5. **VAE decoder** — the decoder alone (the encoder frozen, so the latents the transformer
   learnt stay valid) on all 17 frames with the first frame weighted up.

Deterministic: every random draw comes from seeded generators, ``torch.use_deterministic_algorithms``
is on, and the thread counts are fixed (``--threads``, ``--more-threads``; CPU float sums depend on
them). One thread is the default for the long VAE stages, the fastest choice on a shared 2-core
machine: with two, OpenMP's threads wait for each other whenever another process takes a core
(measured: a VAE step 0.6 s with one thread, 2-9 s with two). The second transformer round uses
two (measured alone on 2 cores: 0.34 s per short step, against 0.58 s with one thread).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .embedded import EMBEDDED_TRANSFORMER_CONFIG, EMBEDDED_VAE_CONFIG, _fresh
from .shapes_data import COLORS, make_clip

__all__ = ["QUICK", "STAGES", "TrainConfig", "main", "train"]

#: The training stages, in order.
STAGES = ("vae", "vae-long", "dit", "dit-more", "vae-decoder")

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (with the code): the shipped weights used the defaults.

    Sizes: clips are ``frames`` x ``size`` x ``size`` (the generation default); the first DiT
    stage uses clips of ``size // 2``.
    """

    seed: int = 0
    threads: int = 1
    size: int = 256
    frames: int = 17
    # VAE
    vae_steps: int = 500
    vae_batch: int = 4
    vae_crop: int = 64
    vae_crop_frames: int = 9
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6
    vae_object_weight: float = 4.0
    vae_long_steps: int = 300
    vae_long_lr: float = 1e-3
    decoder_steps: int = 150
    decoder_lr: float = 5e-4
    decoder_first_frame_weight: float = 4.0
    # latents
    clips: int = 256
    clip_layout: str = "centred"
    clip_two_objects: float = 0.2
    clip_background: str = "dark"
    encode_batch: int = 4
    max_sequence_length: int = 20
    # transformer
    short_steps: int = 2400
    short_latent_frames: int = 3
    dit_steps: int = 600
    dit_batch: int = 4
    dit_lr: float = 2e-3
    dit_object_weight: float = 4.0
    warmup: int = 100
    weight_decay: float = 0.01
    ema: float = 0.995
    uncond_prob: float = 0.1
    flow_shift: float = 3.0
    grad_clip: float = 1.0
    # transformer, second round: a warm restart from the first round's (EMA) weights, with a fresh
    # optimiser and schedule, on the same latents
    more_short_steps: int = 3000
    more_steps: int = 600
    more_lr: float = 1e-3
    more_warmup: int = 50
    more_threads: int = 2


#: The settings the VAE stage depends on (a ``--stages dit`` run checks them against the saved VAE's).
_VAE_FIELDS = ("seed", "threads", "size", "frames", "vae_steps", "vae_batch", "vae_crop", "vae_crop_frames", "vae_lr",
               "vae_kl", "vae_object_weight")
_VAE_LONG_FIELDS = _VAE_FIELDS + ("vae_long_steps", "vae_long_lr")
_DECODER_FIELDS = ("decoder_steps", "decoder_lr", "decoder_first_frame_weight")
_MORE_FIELDS = ("more_short_steps", "more_steps", "more_lr", "more_warmup", "more_threads")

#: A tiny configuration for tests: seconds on a CPU (the weights are useless).
QUICK = TrainConfig(size=64, frames=9, vae_steps=2, vae_batch=2, vae_crop=32, vae_crop_frames=5, vae_long_steps=1,
                    decoder_steps=1, clips=4, encode_batch=2, short_steps=2, short_latent_frames=2, dit_steps=2,
                    dit_batch=2, warmup=1, max_sequence_length=16, more_short_steps=1, more_steps=1,
                    more_warmup=1, more_threads=1)


def _progress(iterable, total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=True, dynamic_ncols=True)


def _object_weight(clips: np.ndarray, weight: float) -> np.ndarray:
    """``1 + weight`` on pixels near any object colour, 1 elsewhere: ``[B, F, H, W]``."""
    palette = np.asarray(list(COLORS.values()), dtype=np.float32)
    dist = np.linalg.norm(clips[..., None, :] - palette, axis=-1).min(-1)
    return 1.0 + weight * (dist < 0.3)


def _latent_object_mask(frames: np.ndarray, temporal: int = 4, spatial: int = 8) -> torch.Tensor:
    """``[B, 1, T, h, w]`` float mask of the latent cells whose pixels show an object, grown by one cell.

    ``frames``: ``[B, F, H, W, 3]`` clips. Latent frame 0 covers frame 0, latent frame ``t`` frames
    ``4t-3 .. 4t`` (the causal VAE's grouping); a cell covers ``spatial x spatial`` pixels.
    """
    palette = np.asarray(list(COLORS.values()), dtype=np.float32)
    near = np.linalg.norm(frames[..., None, :] - palette, axis=-1).min(-1) < 0.3  # [B, F, H, W]
    mask = torch.from_numpy(near).float().unsqueeze(1)  # [B, 1, F, H, W]
    mask = torch.cat([mask[:, :, :1].repeat_interleave(temporal, dim=2), mask], dim=2)  # frame 0 alone
    mask = torch.nn.functional.max_pool3d(mask, (temporal, spatial, spatial))
    return torch.nn.functional.max_pool3d(mask, (1, 3, 3), stride=1, padding=(0, 1, 1))


def _vae_batch(cfg: TrainConfig, rng: np.random.Generator, step: int, crop_frames: int, stream: int) -> np.ndarray:
    """``[B, F, crop, crop, 3]`` random crops of fresh clips, half drawn at the full size, half at half size."""
    out = []
    for b in range(cfg.vae_batch):
        size = cfg.size if b % 2 == 0 else max(cfg.size // 2, cfg.vae_crop)
        clip = make_clip(cfg.seed * 1000 + stream, step * cfg.vae_batch + b, num_frames=cfg.frames, height=size, width=size)
        f0 = int(rng.integers(0, cfg.frames - crop_frames + 1))
        if rng.random() < 0.75:  # centre the crop near an object at some frame
            obj = int(rng.integers(len(clip.objects)))
            cx, cy = clip.centers[obj, int(rng.integers(f0, f0 + crop_frames))]
            x0 = int(np.clip(cx - cfg.vae_crop / 2 + rng.uniform(-0.3, 0.3) * cfg.vae_crop, 0, size - cfg.vae_crop))
            y0 = int(np.clip(cy - cfg.vae_crop / 2 + rng.uniform(-0.3, 0.3) * cfg.vae_crop, 0, size - cfg.vae_crop))
        else:
            x0, y0 = (int(v) for v in rng.integers(0, size - cfg.vae_crop + 1, size=2))
        out.append(clip.frames[f0 : f0 + crop_frames, y0 : y0 + cfg.vae_crop, x0 : x0 + cfg.vae_crop])
    return np.stack(out)


def _to_video(frames: np.ndarray) -> torch.Tensor:
    """``[B, F, H, W, 3]`` in [0, 1] -> ``[B, 3, F, H, W]`` in [-1, 1] (the VAE's input)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 4, 1, 2, 3).mul(2).sub(1).contiguous()


def _cosine_lr(step: int, total: int, warmup: int, base: float, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_vae(vae, cfg: TrainConfig, progress: bool, log, phase: int = 1) -> list[float]:
    """Phase 1: ``vae_steps`` on crops of ``vae_crop_frames`` frames; phase 2: ``vae_long_steps`` on
    crops of all ``frames`` (the later 4-frame chunks go through the causal caches too); phase 3:
    ``decoder_steps`` of the decoder alone (the encoder, and so the transformer's latents, frozen)
    on all ``frames`` with the first frame weighted up (it is one latent frame by itself, 1/17 of
    the pixels)."""
    steps, lr, crop_frames = {1: (cfg.vae_steps, cfg.vae_lr, cfg.vae_crop_frames),
                              2: (cfg.vae_long_steps, cfg.vae_long_lr, cfg.frames),
                              3: (cfg.decoder_steps, cfg.decoder_lr, cfg.frames)}[phase]
    rng = np.random.default_rng([cfg.seed, 1] if phase == 1 else [cfg.seed, 1, phase])
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 1 + 10 * (phase - 1))
    frozen = (vae.encoder, vae.quant_conv) if phase == 3 else ()
    for module in frozen:
        module.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    vae.train()
    losses = []
    desc = {1: "VAE", 2: f"VAE, {crop_frames}-frame crops", 3: "VAE decoder"}[phase]
    bar = _progress(range(steps), steps, desc, progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, min(50, steps // 10 + 1), lr)
        frames = _vae_batch(cfg, rng, step, crop_frames, 100 + phase)
        x = _to_video(frames)
        weight = torch.from_numpy(_object_weight(frames, cfg.vae_object_weight)).unsqueeze(1).float()
        if phase == 3:
            weight[:, :, 0] *= cfg.decoder_first_frame_weight
        with torch.set_grad_enabled(phase != 3):
            posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = ((rec - x).abs() * weight).mean() / weight.mean()
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec_loss + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(rec_loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(l1=f"{np.mean(losses[-10:]):.4f}", kl=f"{float(kl.detach()):.1f}")
    for module in frozen:
        module.requires_grad_(True)
    vae.eval()
    return losses


@torch.no_grad()
def encode_clips(vae, cfg: TrainConfig, count: int, size: int, stream: int, progress: bool, desc: str):
    """Posterior means ``[N, C, T, h, w]`` (float32), object masks ``[N, 1, T, h, w]`` (see
    :func:`_latent_object_mask`) and prompts of clips ``0..count-1`` of a stream (drawn with
    ``cfg.clip_layout`` and ``cfg.clip_two_objects``)."""
    latents, masks, prompts = [], [], []
    batches = range(0, count, cfg.encode_batch)
    for start in _progress(batches, len(batches), desc, progress):
        clips = [make_clip(cfg.seed * 1000 + stream, i, num_frames=cfg.frames, height=size, width=size,
                           layout=cfg.clip_layout, two_objects=cfg.clip_two_objects, background=cfg.clip_background)
                 for i in range(start, min(count, start + cfg.encode_batch))]
        frames = np.stack([c.frames for c in clips])
        latents.append(vae.encode(_to_video(frames)).latent_dist.mean)
        masks.append(_latent_object_mask(frames))
        prompts.extend(c.prompt for c in clips)
    return torch.cat(latents), torch.cat(masks), prompts


@torch.no_grad()
def encode_prompts(prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
    """``{prompt: [L, 384]}`` with the packaged MiniLM, as ``WanPipeline.encode_prompt`` computes them."""
    from diffusers import WanPipeline
    from transformers import AutoModel, AutoTokenizer

    from .embedded import minilm_model_dir

    model_dir = minilm_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    text_encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, scheduler=None, transformer=None)
    unique = sorted(set(prompts) | {""})
    out = {}
    for i in range(0, len(unique), 64):
        chunk = unique[i : i + 64]
        embeds, _ = pipe.encode_prompt(chunk, do_classifier_free_guidance=False,
                                       max_sequence_length=max_sequence_length, device=torch.device("cpu"))
        out.update(zip(chunk, embeds.float()))
    return out


def train_transformer(transformer, stages, embeds, cfg: TrainConfig, progress: bool, log, *, lr: float | None = None,
                      warmup: int | None = None, stream: int = 3) -> list[float]:
    """Flow matching over ``stages``: a list of ``(name, latents [N, C, T, h, w] normalised, object masks
    [N, 1, T, h, w], prompts, steps, batch)``. The squared error is weighted ``1 + dit_object_weight`` on
    the objects' latent cells (a few percent of the frame: unweighted, the loss barely asks where the
    prompt's object is, and the text conditioning is learnt slowly); the losses returned are the
    unweighted MSE. ``lr`` / ``warmup``: the schedule's peak and warm-up (default ``dit_lr`` / ``warmup``);
    ``stream``: seeds the draws (batches, noise, levels)."""
    lr = cfg.dit_lr if lr is None else lr
    warmup = cfg.warmup if warmup is None else warmup
    total = sum(s[4] for s in stages)
    decay, no_decay = [], []
    for name, p in transformer.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or "scale_shift" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    ema = copy.deepcopy(transformer).requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + stream)
    uncond = embeds[""]
    transformer.train()
    losses, step = [], 0
    for name, latents, masks, prompts, steps, batch in stages:
        text = torch.stack([embeds[p] for p in prompts])
        bar = _progress(range(steps), steps, f"DiT {name}", progress)
        for _ in bar:
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(step, total, warmup, lr)
            idx = torch.randint(0, latents.shape[0], (batch,), generator=gen)
            x0 = latents[idx]
            cond = text[idx].clone()
            drop = torch.rand(batch, generator=gen) < cfg.uncond_prob
            cond[drop] = uncond
            u = torch.rand(batch, generator=gen)
            sigma = cfg.flow_shift * u / (1 + (cfg.flow_shift - 1) * u)
            noise = torch.randn(x0.shape, generator=gen)
            s = sigma.view(-1, 1, 1, 1, 1)
            xt = (1 - s) * x0 + s * noise
            pred = transformer(xt, sigma * 1000, cond, return_dict=False)[0]
            error = (pred - (noise - x0)).square()
            weight = 1.0 + cfg.dit_object_weight * masks[idx]
            loss = (error * weight).mean() / weight.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), cfg.grad_clip)
            opt.step()
            d = min(cfg.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), transformer.parameters()):
                    pe.lerp_(p, 1 - d)
            losses.append(float(error.detach().mean()))
            step += 1
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    transformer.eval()
    return losses, ema.eval()


def _smooth(values, window=25):
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return values
    window = max(1, min(window, len(values) // 4 or 1))
    kernel = np.ones(window) / window
    return np.convolve(np.pad(values, (window - 1, 0), mode="edge"), kernel, mode="valid")


def plot_losses(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    parts = [("", record["losses"]["vae_l1"]),
             (f" {record['config']['frames']}-frame crops", record["losses"].get("vae_l1_long", [])),
             (" decoder only", record["losses"].get("vae_l1_decoder", []))]
    vae = [v for _, part in parts for v in part]
    axes[0].plot(vae, color="0.8", lw=0.6)
    start = 0
    for label, part in parts:
        if part:
            axes[0].plot(range(start, start + len(part)), _smooth(part), color="C0")
            if start:
                axes[0].axvline(start, color="k", ls=":", lw=1)
                axes[0].text(start, max(vae), label, va="top", fontsize=8, rotation=90)
        start += len(part)
    axes[0].set(title="VAE: weighted L1 reconstruction", xlabel="step", ylabel="L1 ([-1, 1] pixels)", yscale="log")
    first = record["losses"]["transformer_mse"]
    dit = first + record["losses"].get("transformer_mse_more", [])
    axes[1].plot(dit, color="0.8", lw=0.6)
    axes[1].plot(_smooth(dit, 50), color="C1")
    config = record["config"]
    marks = [(config["short_steps"], f" all {config['frames']} frames")]
    if len(dit) > len(first):
        marks += [(len(first), " second round"), (len(first) + config.get("more_short_steps", 0),
                                                  f" all {config['frames']} frames")]
    for boundary, label in marks:
        if 0 < boundary < len(dit):
            axes[1].axvline(boundary, color="k", ls=":", lw=1)
            axes[1].text(boundary, max(dit), label, va="top", fontsize=8, rotation=90)
    axes[1].set(title="Transformer: flow-matching MSE", xlabel="step", ylabel="MSE (velocity)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def train(cfg: TrainConfig, out: str | os.PathLike, *, stages: tuple[str, ...] = STAGES,
          plot: str | os.PathLike | None = None, progress: bool = True, log=print,
          latents_cache: str | os.PathLike | None = None) -> dict:
    """Train with ``cfg`` and save the VAE and the (EMA) transformer under ``out``; returns the record.

    ``stages``: consecutive names from :data:`STAGES` (``vae``: the VAE on short crops;
    ``vae-long``: then on full-length crops; ``dit``: latents and the transformer;
    ``vae-decoder``: the VAE's decoder alone, the encoder frozen). A run that starts after
    ``vae`` continues from what an earlier run with the same ``cfg`` saved in ``out``; the
    weights are the same as those of one run of every stage. ``plot``: a PNG of the loss curves,
    drawn when the run ends with the last stage. ``latents_cache``: a file for the encoded training
    clips of the ``dit`` stage, written after encoding and read by later runs with the same
    settings and VAE encoder (the record keeps the encoding's own time).
    """
    stages = tuple(stages)
    if not stages or stages != STAGES[STAGES.index(stages[0]) if stages[0] in STAGES else 0:][: len(stages)]:
        raise ValueError(f"stages must be consecutive names from {STAGES}, got {stages!r}")
    out = Path(out)
    t0 = time.perf_counter()
    record = _train_until_dit(cfg, out, stages=tuple(s for s in stages if s != "vae-decoder"), progress=progress,
                              log=log, latents_cache=latents_cache) if stages != ("vae-decoder",) else None
    if "vae-decoder" not in stages:
        return record
    record_path = out / "training.json"
    if record is None:
        record = {"config": dataclasses.asdict(cfg), "torch": torch.__version__}
        previous = json.loads(record_path.read_text())
        changed = [k for k in _VAE_LONG_FIELDS + tuple(f.name for f in dataclasses.fields(TrainConfig)
                                                       if f.name not in _DECODER_FIELDS)
                   if previous["config"].get(k) != record["config"][k]]
        if changed or "transformer_mse" not in previous.get("losses", {}):
            raise ValueError(f"{out} does not hold the stages before vae-decoder run with these settings "
                             f"({', '.join(sorted(set(changed))) or 'no transformer yet'}); run them first")
        record.update({k: previous[k] for k in ("times_s", "final", "losses", "latents_mean", "latents_std")})
        torch.set_num_threads(cfg.threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    record = _train_decoder(cfg, out, record, progress, log)
    record["times_s"]["total"] = round(sum(v for k, v in record["times_s"].items() if k != "total"), 1)
    record_path.write_text(json.dumps(record, indent=1))
    if plot:
        plot_losses(record, Path(plot))
    log(f"saved {out / 'vae'} and {out / 'transformer'}: {record['times_s']['total'] / 60:.1f} min of training "
        f"(VAE L1 {record['final'].get('vae_l1_decoder', record['final']['vae_l1']):.4f}, "
        f"transformer MSE {record['final']['transformer_mse']:.4f}); this run {(time.perf_counter() - t0) / 60:.1f} min")
    return record


def _encoded_clips(vae, cfg: TrainConfig, cache: Path | None, progress: bool, log):
    """``encode_clips`` of the transformer's training clips, or what an earlier run saved in ``cache``
    (a ``.pt`` file, used when the settings that decide the clips and the VAE's encoder weights are the
    same); returns latents, masks, prompts and the seconds the encoding took when it ran."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    key = {"encoder": digest.hexdigest(), **{k: getattr(cfg, k) for k in (
        "seed", "threads", "size", "frames", "clips", "clip_layout", "clip_two_objects", "clip_background",
        "encode_batch")}}
    if cache is not None and Path(cache).is_file():
        saved = torch.load(str(cache), weights_only=True)
        if saved.get("key") == key:
            log(f"latents from {cache} (encoded in {saved['seconds']:.0f} s)")
            return saved["latents"], saved["masks"], list(saved["prompts"]), float(saved["seconds"])
        log(f"{cache} holds latents of other settings or another VAE: encoding again")
    t = time.perf_counter()
    latents, masks, prompts = encode_clips(vae, cfg, cfg.clips, cfg.size, 201, progress, "encode clips")
    seconds = time.perf_counter() - t
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "latents": latents, "masks": masks, "prompts": prompts, "seconds": seconds}, str(cache))
    return latents, masks, prompts, 0.0


def _train_until_dit(cfg: TrainConfig, out: Path, *, stages: tuple[str, ...], progress: bool, log,
                     latents_cache: Path | None = None) -> dict:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel


    out = Path(out)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN (to expose reads of uninitialised
    # memory): a third of the step time on CPU, and not needed for reproducibility.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    # Both models are built first, in this order, so the transformer's initial weights do not
    # depend on which stages run in this process.
    vae = AutoencoderKLWan(**_fresh(EMBEDDED_VAE_CONFIG))
    transformer = WanTransformer3DModel(**_fresh(EMBEDDED_TRANSFORMER_CONFIG))
    log(f"VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, "
        f"transformer {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f} M")
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "training.json"
    record = {"config": dataclasses.asdict(cfg), "torch": torch.__version__, "times_s": {}, "final": {}, "losses": {}}

    def check_previous(fields, stage):
        previous = json.loads(record_path.read_text())
        changed = [k for k in fields if previous["config"].get(k) != record["config"][k]]
        if changed:
            raise ValueError(f"the VAE in {out / 'vae'} was trained with other settings ({', '.join(changed)}); "
                             f"run the earlier stages again (--stages {','.join(STAGES[:STAGES.index(stage) + 1])})")
        record.update({k: previous[k] for k in ("times_s", "final", "losses", "latents_mean", "latents_std")
                       if k in previous})

    # Each stage after the first starts from the VAE the previous one saved, loaded from disk even
    # in one run (from_pretrained's tensors are aligned differently from trained ones in memory,
    # and CPU sums then differ in the last bits): so running the stages one by one gives the same
    # weights as one run of all.
    if "vae" in stages:
        with torch.no_grad():  # posterior std 0.05 at the start (1 would drown the small initial latents)
            vae.quant_conv.bias[vae.config.z_dim:] = -6.0
        vae_losses = train_vae(vae, cfg, progress, log)
        vae.save_pretrained(str(out / "vae"), safe_serialization=True)
        record["times_s"]["vae"] = round(time.perf_counter() - t0, 1)
        record["final"]["vae_l1"] = float(np.mean(vae_losses[-50:]))
        record["losses"]["vae_l1"] = [round(v, 5) for v in vae_losses]
        record_path.write_text(json.dumps(record, indent=1))
    if "vae-long" in stages:
        if "vae" not in stages:
            check_previous(_VAE_FIELDS, "vae")
        t = time.perf_counter()
        vae = AutoencoderKLWan.from_pretrained(str(out / "vae"))
        long_losses = train_vae(vae, cfg, progress, log, phase=2) if cfg.vae_long_steps else []
        vae.save_pretrained(str(out / "vae"), safe_serialization=True)
        record["times_s"]["vae_long"] = round(time.perf_counter() - t, 1)
        if long_losses:
            record["final"]["vae_l1_long"] = float(np.mean(long_losses[-50:]))
        record["losses"]["vae_l1_long"] = [round(v, 5) for v in long_losses]
        record_path.write_text(json.dumps(record, indent=1))
    if "dit" not in stages and "dit-more" not in stages:
        return record
    if "vae-long" not in stages:
        check_previous(_VAE_LONG_FIELDS, "vae-long")
    if "dit" not in stages:
        check_previous(tuple(f.name for f in dataclasses.fields(TrainConfig)
                             if f.name not in _DECODER_FIELDS + _MORE_FIELDS), "dit")
        if "transformer_mse" not in record["losses"]:
            raise ValueError(f"{out} holds no transformer of the dit stage; run it first (--stages dit,dit-more)")
    vae = AutoencoderKLWan.from_pretrained(str(out / "vae")).eval()

    t1 = time.perf_counter()
    full, masks, prompts, encode_s = _encoded_clips(vae, cfg, latents_cache, progress, log)
    mean = full.mean(dim=(0, 2, 3, 4))
    std = full.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    vae.register_to_config(latents_mean=[round(float(v), 5) for v in mean],
                           latents_std=[round(float(v), 5) for v in std])

    def normalise(z):
        return ((z - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)).contiguous()

    embeds = encode_prompts(prompts, cfg.max_sequence_length)
    latents = normalise(full)

    def dit_stages(short_steps: int, steps: int) -> list:
        stages_ = []
        if short_steps:
            # The VAE is causal: the first k latent frames of a clip are the latents of its first 4(k-1)+1
            # frames, so the short stage (a shorter sequence, cheaper steps) needs no encoding of its own.
            k = cfg.short_latent_frames
            short, short_masks = latents[:, :, :k].contiguous(), masks[:, :, :k].contiguous()
            stages_.append((f"{4 * (short.shape[2] - 1) + 1} frames", short, short_masks, prompts, short_steps,
                            cfg.dit_batch))
        stages_.append((f"{cfg.frames} frames", latents, masks, prompts, steps, cfg.dit_batch))
        return stages_

    if "dit" in stages:
        # With a latents cache: the time the encoding took when it ran.
        record["times_s"]["latents"] = round(time.perf_counter() - t1 + encode_s, 1)
        t2 = time.perf_counter()
        dit_losses, ema = train_transformer(transformer, dit_stages(cfg.short_steps, cfg.dit_steps), embeds, cfg,
                                            progress, log)
        record["times_s"]["transformer"] = round(time.perf_counter() - t2, 1)
        vae.save_pretrained(str(out / "vae"), safe_serialization=True)  # now with latents_mean / latents_std
        ema.save_pretrained(str(out / "transformer"), safe_serialization=True)
        record["final"]["transformer_mse"] = float(np.mean(dit_losses[-100:]))
        record["latents_mean"] = [float(v) for v in mean]
        record["latents_std"] = [float(v) for v in std]
        record["losses"]["transformer_mse"] = [round(v, 5) for v in dit_losses]
        record_path.write_text(json.dumps(record, indent=1))
    if "dit-more" in stages:
        # The second round starts from the weights the first one saved, loaded from disk (as every stage does).
        torch.set_num_threads(cfg.more_threads)
        t3 = time.perf_counter()
        transformer = WanTransformer3DModel.from_pretrained(str(out / "transformer"))
        more_losses, ema = train_transformer(transformer, dit_stages(cfg.more_short_steps, cfg.more_steps), embeds,
                                             cfg, progress, log, lr=cfg.more_lr, warmup=cfg.more_warmup, stream=4)
        record["times_s"]["transformer_more"] = round(time.perf_counter() - t3, 1)
        ema.save_pretrained(str(out / "transformer"), safe_serialization=True)
        record["final"]["transformer_mse_more"] = float(np.mean(more_losses[-100:]))
        record["losses"]["transformer_mse_more"] = [round(v, 5) for v in more_losses]
        record_path.write_text(json.dumps(record, indent=1))
        torch.set_num_threads(cfg.threads)
    return record


def _train_decoder(cfg: TrainConfig, out: Path, record: dict, progress: bool, log) -> dict:
    from diffusers import AutoencoderKLWan

    t = time.perf_counter()
    vae = AutoencoderKLWan.from_pretrained(str(out / "vae"))
    losses = train_vae(vae, cfg, progress, log, phase=3) if cfg.decoder_steps else []
    vae.save_pretrained(str(out / "vae"), safe_serialization=True)  # keeps latents_mean / latents_std
    record["times_s"]["vae_decoder"] = round(time.perf_counter() - t, 1)
    if losses:
        record["final"]["vae_l1_decoder"] = float(np.mean(losses[-50:]))
    record["losses"]["vae_l1_decoder"] = [round(v, 5) for v in losses]
    return record


def _default_out() -> Path:
    return Path(__file__).resolve().parent / "embedded_weights"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffattn.pipelines.train_embedded",
                                     description="Train the embedded tiny Wan pipeline's VAE and transformer on "
                                                 "procedural clips of coloured shapes (CPU, deterministic).")
    parser.add_argument("--out", default=str(_default_out()),
                        help="folder for vae/, transformer/ and training.json (default: the package's embedded_weights)")
    parser.add_argument("--plot", default=None, help="PNG of the loss curves (default: <out>/training_loss.png)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="consecutive stages of vae,vae-long,dit,vae-decoder (default: all); a run starting later continues "
                             "from the VAE an earlier run saved in --out")
    parser.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds (for tests)")
    parser.add_argument("--latents-cache", default=None,
                        help="file (.pt) for the dit stage's encoded clips: written once, reused by runs with the same "
                             "settings and VAE encoder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=None,
                            help=f"default {field.default} ({QUICK.__getattribute__(field.name)} with --quick)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else TrainConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    cfg = dataclasses.replace(base, **overrides)
    plot = args.plot or str(Path(args.out) / "training_loss.png")
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    record = train(cfg, args.out, stages=stages, plot=plot, progress=not args.no_progress,
                   latents_cache=args.latents_cache)
    if set(stages) <= {"vae", "vae-long"}:
        print(f"saved {Path(args.out) / 'vae'} (VAE L1 {record['final']['vae_l1']:.4f})")
    elif "vae-decoder" not in stages:
        print(f"saved {Path(args.out) / 'transformer'} (transformer MSE "
              f"{record['final'].get('transformer_mse_more', record['final']['transformer_mse']):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
