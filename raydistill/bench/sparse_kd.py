"""``raydistill bench sparse-kd``: the error of sparse KD (``kd`` with ``top_k``) against full-vocabulary KD on a
trained teacher.

In one process: a BPE tokenizer (8192 tokens) trained on a text corpus (WikiText-2's training split in the
measurements docs/objectives.md reports), a tiny GPT-2 teacher (4 blocks, width 128) trained on the task loss
for ``teacher_steps`` and a smaller student (2 blocks, width 64) trained for ``student_steps``, so that both have
the peaked next-token distributions of trained language models (random ones are nearly uniform and would make
any top-K look bad). On held-out blocks it then compares, per temperature and K, the mean over positions of

- full KD, tau^2 KL(p_tau || q_tau) over the vocabulary (``soft_kl``), against sparse KD (``sparse_kl`` from
  ``teacher_topk``): ``gap`` = (full - sparse) / full (positive: sparse KD underestimates);
- the gradients for the student's logits: their cosine similarity and the relative norm of their difference;
- the teacher's mass outside its top K (``rest_mass``, mean and 99th percentile over positions);
- at K = ``distill_k``, sampled sparse KD (``sampled_kl``: the top K plus S tail samples, ``tail_samples``) for
  each S: the same gap and gradient columns for one draw (step seed 0), and over ``draws`` draws the spread of
  the gap (``gap_sd``) and the cosine of the draws' mean gradient (``grad_cosine_mean``): an unbiased
  estimator's mean gradient tends to full KD's.

Then students from one initialisation are distilled on the same batches with full KD, top-K KD and top-K +
``distill_samples`` samples (a fresh draw each step), and their held-out cross-entropy compared.
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import torch

from raydistill.bench.data import DEFAULT_TEXT
from raydistill.objectives.kd import sampled_kl, sparse_kl
from raydistill.objectives.soft_kl import soft_kl
from raydistill.objectives.teacher_signals import teacher_tail, teacher_topk

TARGET = 0.01  # the target: sparse KD at K = 64 within 1% of full KD


def _model(vocab: int, layers: int, width: int, seq: int, seed: int):
    """A GPT-2 of the given shape (bos/eos inside the vocabulary; they are not used)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=width, n_layer=layers,
                                      n_head=max(1, width // 32), bos_token_id=0, eos_token_id=0))


def _train(model, blocks: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> float:
    """``steps`` AdamW steps of next-token cross-entropy on random blocks; returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up over the first 10%
            group["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 10))
        ids = blocks[torch.randint(len(blocks), (batch,), generator=g)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def _kd_loss(t: torch.Tensor, z: torch.Tensor, ids: torch.Tensor, top_k: int | None, samples: int,
             step_seed: int) -> torch.Tensor:
    """Per-position KD at tau = 1: full, top-K (rest bucket) or top-K + ``samples`` tail samples."""
    if top_k is None:
        return soft_kl(t, z, 1.0)
    top = teacher_topk(t, top_k)
    if not samples:
        return sparse_kl(top, z, 1.0)
    return sampled_kl(top, teacher_tail(t, top.ids, samples, ids, step_seed), z, 1.0)


def _distill_outcomes(teacher, blocks, held_out, vocab, seq, batch, steps, k, seed, samples=0) -> list[dict]:
    """Students from one initialisation distilled for ``steps`` steps on the same batches with full KD, with
    sparse KD (top ``k``) and, when ``samples``, top ``k`` + that many tail samples (drawn afresh each step), all
    at tau = 1 with no task term; their held-out cross-entropy and full KD."""
    with torch.no_grad():
        t_held = torch.cat([teacher(input_ids=b).logits for b in held_out.split(batch)])
    out = []
    variants = [("kd", None, 0), (f"kd top_k={min(k, vocab)}", min(k, vocab), 0)]
    if samples:
        variants.append((f"kd top_k={min(k, vocab)} tail_samples={samples}", min(k, vocab), samples))
    for name, top_k, tail in variants:
        student = _model(vocab, 2, 64, seq, seed + 2)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed + 3)
        student.train()
        for step in range(steps):
            ids = blocks[torch.randint(len(blocks), (batch,), generator=g)]
            with torch.no_grad():
                t = teacher(input_ids=ids).logits
            z = student(input_ids=ids).logits
            loss = _kd_loss(t, z, ids, top_k, tail, step + 1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        student.eval()
        with torch.no_grad():
            z = torch.cat([student(input_ids=b).logits for b in held_out.split(batch)])
        ce = torch.nn.functional.cross_entropy(z[:, :-1].reshape(-1, vocab), held_out[:, 1:].reshape(-1))
        out.append({"objective": name, "steps": steps, "held_out_ce": ce.item(),
                    "held_out_full_kd": soft_kl(t_held, z, 1.0).mean().item()})
    full = out[0]
    for other in out[1:]:
        other["ce_vs_full"] = other["held_out_ce"] / full["held_out_ce"] - 1
        other["full_kd_vs_full"] = other["held_out_full_kd"] / full["held_out_full_kd"] - 1
    return out


def _blocks(path: Path, tok, seq: int, max_chars: int) -> torch.Tensor:
    text = path.read_text(encoding="utf-8")[:max_chars]
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    n = len(ids) // seq
    return ids[: n * seq].view(n, seq)


def bench_sparse_kd(ks=(16, 64, 256), temperatures=(1.0, 2.0), text: str | None = None, teacher_steps: int = 300,
                    student_steps: int = 100, seq: int = 64, batch: int = 16, eval_blocks: int = 64,
                    max_chars: int = 2_000_000, distill_steps: int = 100, distill_k: int = 64,
                    vocab_size: int = 8192, seed: int = 0, tail_samples=(8, 16, 32), draws: int = 4,
                    distill_samples: int = 16) -> dict:
    from raydistill.data.tokenizer import train_tokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_path = Path(text) if text else DEFAULT_TEXT
    if not train_path.is_file():
        raise FileNotFoundError(f"no corpus at {train_path}: pass --text FILE (UTF-8 text, e.g. WikiText-2's "
                                "wiki.train.tokens)")
    started = time.perf_counter()
    lines = train_path.read_text(encoding="utf-8")[:max_chars].splitlines()
    tok = train_tokenizer(lines, "bpe", vocab_size)
    blocks = _blocks(train_path, tok, seq, max_chars)
    valid_path = train_path.with_name("wiki.valid.tokens")
    if valid_path.is_file() and valid_path != train_path:
        held_out = _blocks(valid_path, tok, seq, max_chars)[:eval_blocks]
    else:  # no validation split beside it: the last blocks, never trained on
        blocks, held_out = blocks[:-eval_blocks], blocks[-eval_blocks:]
    vocab = len(tok)
    teacher = _model(vocab, 4, 128, seq, seed)
    student = _model(vocab, 2, 64, seq, seed + 1)
    teacher_loss = _train(teacher, blocks, teacher_steps, batch, 1e-3, seed)
    student_loss = _train(student, blocks, student_steps, batch, 1e-3, seed + 1)
    with torch.no_grad():
        t_logits = torch.cat([teacher(input_ids=b).logits for b in held_out.split(batch)])
        s_logits = torch.cat([student(input_ids=b).logits for b in held_out.split(batch)])
    probs = t_logits.float().softmax(-1)
    top1 = probs.amax(-1).mean().item()
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean().item()

    def loss_and_grad(fn):
        z = s_logits.clone().requires_grad_(True)
        value = fn(z).mean()
        value.backward()
        return value.item(), z.grad.flatten()

    def cosine(a, b):
        return torch.nn.functional.cosine_similarity(a, b, dim=0).item()

    def row(tau, k, samples, full, g_full, sparse, g_sparse, rest):
        return {"temperature": tau, "k": k, "tail_samples": samples, "full_kd": full, "sparse_kd": sparse,
                "gap": (full - sparse) / full, "grad_cosine": cosine(g_full, g_sparse),
                "grad_rel_error": ((g_full - g_sparse).norm() / g_full.norm()).item(),
                "rest_mass": rest.mean().item(), "rest_mass_p99": rest.flatten().quantile(0.99).item()}

    rows = []
    for tau in temperatures:
        full, g_full = loss_and_grad(lambda z: soft_kl(t_logits, z, tau))
        for k in ks:
            topk = teacher_topk(t_logits, k)
            sparse, g_sparse = loss_and_grad(lambda z: sparse_kl(topk, z, tau))
            rows.append(row(tau, k, 0, full, g_full, sparse, g_sparse, 1 - topk.logprobs.exp().sum(-1)))
        topk = teacher_topk(t_logits, min(distill_k, vocab))
        for samples in tail_samples:
            values, grads = [], []
            for draw in range(max(1, draws)):  # draw d: the uniforms of step seed d
                tail = teacher_tail(t_logits, topk.ids, samples, held_out, draw, tau)
                value, grad = loss_and_grad(lambda z: sampled_kl(topk, tail, z, tau))
                values.append(value)
                grads.append(grad)
            r = row(tau, topk.ids.size(-1), samples, full, g_full, values[0], grads[0],
                    1 - topk.logprobs.exp().sum(-1))
            gaps = torch.tensor([(full - v) / full for v in values])
            r.update(draws=len(values), gap_mean=gaps.mean().item(),
                     gap_sd=gaps.std().item() if len(values) > 1 else float("nan"),
                     grad_cosine_mean=cosine(g_full, torch.stack(grads).mean(0)))
            rows.append(r)
            del grads
    distilled = _distill_outcomes(teacher, blocks, held_out, vocab, seq, batch, distill_steps, distill_k, seed,
                                  distill_samples)
    at = [r for r in rows if r["k"] == 64]
    return {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "setup": {"corpus": train_path.name, "vocab": vocab, "seq": seq, "teacher": "GPT-2 4x128",
                  "student": "GPT-2 2x64", "teacher_steps": teacher_steps, "student_steps": student_steps,
                  "teacher_train_loss": teacher_loss, "student_train_loss": student_loss,
                  "eval_positions": int(t_logits.shape[0] * t_logits.shape[1]),
                  "teacher_top1_prob": top1, "teacher_entropy_nats": entropy,
                  "uniform_entropy_nats": math.log(vocab)},
        "rows": rows,
        "distilled": distilled,
        "target": {"k": 64, "max_gap": TARGET,
                   "gaps": {f"tau={r['temperature']:g} S={r['tail_samples']}": r["gap"] for r in at},
                   "met_by": [f"tau={r['temperature']:g} S={r['tail_samples']}" for r in at
                              if abs(r["gap"]) <= TARGET]},
        "seconds": time.perf_counter() - started,
    }


def table(result: dict) -> str:
    s = result["setup"]
    lines = [f"sparse KD vs full KD: {s['corpus']}, BPE {s['vocab']}, {s['teacher']} teacher "
             f"({s['teacher_steps']} steps, top-1 prob {s['teacher_top1_prob']:.2f}, entropy "
             f"{s['teacher_entropy_nats']:.2f} nats) -> {s['student']} student ({s['student_steps']} steps), "
             f"{s['eval_positions']} held-out positions",
             f"{'tau':>4} {'K':>5} {'S':>4} {'full KD':>9} {'sparse KD':>10} {'gap':>8} {'grad cos':>9} "
             f"{'grad err':>9} {'rest mass':>10} {'p99':>7}  (S: tail samples, 0 = rest bucket; one draw; over "
             f"draws: gap mean +- sd, cosine of the mean gradient)"]
    for r in result["rows"]:
        line = (f"{r['temperature']:>4g} {r['k']:>5} {r['tail_samples']:>4} {r['full_kd']:>9.4f} "
                f"{r['sparse_kd']:>10.4f} {100 * r['gap']:>7.2f}% {r['grad_cosine']:>9.4f} "
                f"{r['grad_rel_error']:>9.4f} {r['rest_mass']:>10.4f} {r['rest_mass_p99']:>7.4f}")
        if "draws" in r:
            line += (f"  {r['draws']} draws: gap {100 * r['gap_mean']:+.2f}% +- {100 * r['gap_sd']:.2f}%, "
                     f"mean-gradient cos {r['grad_cosine_mean']:.4f}")
        lines.append(line)
    for d in result["distilled"]:
        rel = (f" ({100 * d['ce_vs_full']:+.2f}% CE, {100 * d['full_kd_vs_full']:+.2f}% full KD vs full-KD student)"
               if "ce_vs_full" in d else "")
        lines.append(f"student distilled {d['steps']} steps with {d['objective']} (tau 1): held-out CE "
                     f"{d['held_out_ce']:.4f}, full KD {d['held_out_full_kd']:.4f}{rel}")
    t = result["target"]
    met = ", ".join(t["met_by"]) if t["met_by"] else "none"
    lines.append(f"target: |gap| at K=64 <= {100 * t['max_gap']:g}%: met by {met}")
    return "\n".join(lines)
