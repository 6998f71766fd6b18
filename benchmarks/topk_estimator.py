"""Error of the perturbed top-K's Monte-Carlo gradient, plain against centred.

For a bag of N [0, 1]-scaled scores and a random linear functional <W, T> of the soft selector,
the gradient d<W, T>/da is estimated from S noise samples, as training does, and compared with
a reference from 200,000 samples. Plain is E[<W, Y> Z] / sigma (the estimator of Cordonnier et
al. and of ZoomMIL); centred is what ``PerturbedTopKFunction`` computes: each sample's inner
product minus the mean of the other samples' (a baseline independent of that sample's noise, so
still unbiased). The reference uses the centred form with a baseline from separate samples.

    python benchmarks/topk_estimator.py            # N = 50, 500, 2000; K = 12; S = 500

W is drawn with mean 0 (no common part: centring cannot help) and mean 1 (a common part, as a
downstream gradient has when the patches' features are alike). Prints, per case, the relative
error ||g - g_ref|| / ||g_ref|| of each estimator, mean over
repeats, and their ratio.
"""
from __future__ import annotations

import argparse
import json

import torch

from zoompipe.model.topk import PerturbedTopKFunction, topk_indices


def inner_products(scores: torch.Tensor, weight: torch.Tensor, noise: torch.Tensor, k: int,
                   sigma: float) -> torch.Tensor:
    """<W, Y(a + sigma z_s)> for every sample s."""
    selected = topk_indices(scores + sigma * noise, k)  # (S, K)
    return weight[torch.arange(k), selected].sum(dim=-1)


def reference_gradient(scores, weight, k, sigma, n_samples, gen, chunk=5000):
    pilot = torch.randn(chunk, len(scores), generator=gen, dtype=scores.dtype)
    baseline = inner_products(scores, weight, pilot, k, sigma).mean()
    total = torch.zeros_like(scores)
    for _ in range(n_samples // chunk):
        noise = torch.randn(chunk, len(scores), generator=gen, dtype=scores.dtype)
        total += (inner_products(scores, weight, noise, k, sigma) - baseline) @ noise
    return total / (n_samples // chunk * chunk * sigma)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[50, 500, 2000])
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--reference-samples", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--weight-mean", type=float, nargs="+", default=[0.0, 1.0],
                        help="Mean of W's entries: a downstream gradient with a common part "
                             "(features alike across patches) has a non-zero mean.")
    args = parser.parse_args()
    results = []
    for weight_mean, n in ((m, n) for m in args.weight_mean for n in args.n):
        gen = torch.Generator().manual_seed(n)
        scores = torch.rand(n, generator=gen, dtype=torch.float64)
        weight = torch.randn(args.k, n, generator=gen, dtype=torch.float64) + weight_mean
        reference = reference_gradient(scores, weight, args.k, args.sigma, args.reference_samples, gen)
        errors = {"plain": [], "centred": []}
        for repeat in range(args.repeats):
            torch.manual_seed(1000 + repeat)
            a = scores[None].clone().requires_grad_()
            selector = PerturbedTopKFunction.apply(a, args.k, args.samples, args.sigma)
            (selector[0] * weight).sum().backward()
            errors["centred"].append(float((a.grad[0] - reference).norm() / reference.norm()))
            # The same noise as the library drew, through the plain (uncentred) formula.
            torch.manual_seed(1000 + repeat)
            noise = torch.randn(1, args.samples, n, dtype=torch.float64)[0]
            plain = inner_products(scores, weight, noise, args.k, args.sigma) @ noise
            plain = plain / (args.samples * args.sigma)
            errors["plain"].append(float((plain - reference).norm() / reference.norm()))
        row = {"n": n, "k": args.k, "samples": args.samples, "weight_mean": weight_mean,
               **{name: sum(v) / len(v) for name, v in errors.items()}}
        row["ratio"] = row["plain"] / row["centred"]
        results.append(row)
        print(f"W mean {weight_mean:g}, N={n:5d} K={args.k} S={args.samples}: relative error plain {row['plain']:.2f}, "
              f"centred {row['centred']:.2f} ({row['ratio']:.1f}x lower)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
