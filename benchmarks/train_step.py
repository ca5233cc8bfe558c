"""One SAE training step on CPU, side by side with its roofline and with peer libraries.

A step is forward + backward + Adam (+ our decoder normalisation and gradient projection and
the firing tracker, as the trainer runs them), batch 4096, d_in 768, 12288 latents, k 32, fp32.
The roofline is one dense ``[batch, d_in] x [d_in, n_latents]`` matmul: the encoder's forward
product, which every SAE step must do. ``ratio = matmul time / step time`` (1.0 would be a step
costing only that one product). BatchTopK and Matryoshka are reported relative to TopK, and
the same under bf16 autocast. Peers (sparsify, SAELens, overcomplete) are timed where they can
be imported (they are installed in a separate venv: run this file with that venv's python and
``PYTHONPATH`` pointing at the repository); otherwise they print "not installed".

    python benchmarks/train_step.py [--batch 4096 --d-in 768 --n-latents 12288 --k 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import prisma_mm.sae as S
from prisma_mm.sae.fit import adam

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = _clock()
        fn()
        times.append(_clock() - start)
    return statistics.median(times)


def _ours(arch: str, args, x: torch.Tensor, bf16: bool) -> Callable[[], None]:
    kwargs = dict(d_in=args.d_in, n_latents=args.n_latents, k=args.k)
    if arch == "matryoshka":
        n = args.n_latents
        kwargs["group_sizes"] = [
            n // 16,
            n // 16,
            n // 8,
            n // 4,
            n - n // 16 * 2 - n // 8 - n // 4,
        ]
    sae = S.build(arch, **kwargs).train()
    sae.init_from_sample(x[:1024])
    opt = adam(sae.parameters(), 1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = sae(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_decoder_grad_parallel_()
        opt.step()
        sae.normalize_decoder_()
        sae.on_train_batch_end(out)

    return step


def _sparsify(args, x: torch.Tensor) -> Callable[[], None]:
    # its Triton decoder needs a GPU; on CPU sparsify's own eager embedding_bag path is the one
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(args.d_in, SparseCoderConfig(num_latents=args.n_latents, k=args.k))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step() -> None:
        out = sae(x)
        opt.zero_grad(set_to_none=True)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


def _saelens(args, x: torch.Tensor) -> Callable[[], None]:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    cfg = TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.n_latents, k=args.k)
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    # TrainStepInput's fields vary across SAELens versions: fill the ones this version has
    known = {"sae_in": x, "coefficients": {}, "dead_neuron_mask": None}
    known.update(n_training_steps=0, is_logging_step=False)
    fields = TrainStepInput.__dataclass_fields__
    step_input = TrainStepInput(**{k: v for k, v in known.items() if k in fields})

    def step() -> None:
        out = sae.training_forward_pass(step_input)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def _overcomplete(args, x: torch.Tensor) -> Callable[[], None]:
    from overcomplete.sae import TopKSAE as OvercompleteTopK

    sae = OvercompleteTopK(args.d_in, nb_concepts=args.n_latents, top_k=args.k, device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step() -> None:
        _, codes, x_hat = sae(x)
        loss = (x - x_hat).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


PEERS = {"sparsify": _sparsify, "SAELens": _saelens, "overcomplete": _overcomplete}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--n-latents", type=int, default=12288)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast steps")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="cpu: this process's CPU time (user + system), which other jobs sharing the "
        "machine barely disturb; with one thread it is the wall time of an idle machine",
    )
    args = parser.parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    w = torch.randn(args.d_in, args.n_latents) / args.d_in**0.5
    print(
        f"torch {torch.__version__}, {args.threads} threads; batch {args.batch}, d_in {args.d_in},"
        f" {args.n_latents} latents, k {args.k}; median of {args.repeats}, {args.clock} clock"
    )

    rows: list[tuple[str, float, float]] = []

    def report(name: str, seconds: float, roof: float) -> None:
        rows.append((name, seconds, roof / seconds))
        print(f"{name:<34s} {seconds * 1e3:9.1f} ms   ratio to roofline {roof / seconds:5.2f}")

    roof = _time(lambda: x @ w, args.repeats)
    print(f"{'roofline matmul fp32':<34s} {roof * 1e3:9.1f} ms")
    roof_bf16 = roof
    if not args.no_bf16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            roof_bf16 = _time(lambda: x @ w, args.repeats)
        print(f"{'roofline matmul bf16 autocast':<34s} {roof_bf16 * 1e3:9.1f} ms")

    ours: dict[tuple[str, bool], float] = {}
    precisions = (False,) if args.no_bf16 else (False, True)
    for bf16 in precisions:
        for arch in ("topk", "batchtopk", "matryoshka"):
            seconds = _time(_ours(arch, args, x, bf16), args.repeats)
            ours[arch, bf16] = seconds
            label = f"prisma-mm {arch}{' bf16' if bf16 else ''}"
            report(label, seconds, roof_bf16 if bf16 else roof)
    for bf16 in precisions:
        tag = " bf16" if bf16 else ""
        for arch in ("batchtopk", "matryoshka"):
            rel = ours[arch, bf16] / ours["topk", bf16]
            print(f"{arch}{tag} step / topk{tag} step: {rel:.2f} (target <= 1.30)")

    if not args.no_peers:
        for name, make in PEERS.items():
            try:
                step = make(args, x)
            except ImportError:
                print(f"{name:<34s} not installed")
                continue
            except Exception as err:  # a peer that imports but cannot run here: say why
                print(f"{name:<34s} failed to build: {type(err).__name__}: {err}")
                continue
            try:
                report(name, _time(step, args.repeats), roof)
            except Exception as err:
                print(f"{name:<34s} failed to run: {type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
