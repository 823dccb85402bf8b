#!/usr/bin/python3
"""One LoRA (or full) fine-tuning step of GPT-2 small in PyTorch, the baseline of scripts/bench_gpt2.sh.

Run it with Debian's interpreter (/usr/bin/python3, python3-torch 1.13.1): the model is built from torch.nn
the way Hugging Face's GPT2LMHeadModel is (pre-LN blocks, Conv1D weights stored in x out and applied as
addmm(b, x, W), eager causal attention, GELU with the tanh approximation, LM head tied to wte), with random
frozen weights. LoRA is applied the way PEFT applies it to those Conv1D layers (unmerged):

    y = base(x) + lora_B(lora_A(dropout(x))) * alpha / r,   lora_A: Linear(in, r), lora_B: Linear(r, out)

on attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj (r = 8, alpha = 16, dropout 0, A kaiming-uniform with
a = sqrt(5), B zero: the timing does not depend on B's values). AdamW (torch.optim.AdamW, lr 1e-4) steps the
adapter parameters, or with --full every parameter (full fine-tuning). Dropout in the model is 0 (our C++
model has none), so no dropout kernel runs.

A step is zero_grad + forward + cross-entropy over all B*T positions + backward + AdamW.step. The script
runs --warmup steps, times --steps more, and reports the median step time as tokens/s (B*T / median) and the
process's peak RSS (getrusage ru_maxrss, which includes building the model), with the machine's 1-minute
load average before the first step (a figure taken on a busy machine is not a measurement).

Usage: /usr/bin/python3 benchmarks/torch_gpt2_step.py [--threads 2] [--ctx 256] [--batch 4] [--steps 10]
           [--warmup 2] [--full] [--rank 8] [--gelu tanh|hf] [--json OUT]
"""
import argparse
import json
import os
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (torch, OpenMP, OpenBLAS)")
    p.add_argument("--ctx", type=int, default=256, help="sequence length T")
    p.add_argument("--batch", type=int, default=4, help="batch size B")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (alpha = 2 r)")
    p.add_argument("--gelu", choices=["tanh", "hf"], default="tanh",
                   help="tanh: F.gelu(approximate='tanh') (one kernel); hf: transformers' NewGELUActivation")
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (12 for GPT-2 small)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here as JSON")
    return p.parse_args(argv)


ARGS = parse_args(sys.argv[1:])
# The pools read these when torch loads: one setting for every library torch may call.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Conv1D(nn.Module):
    """transformers' Conv1D: weight in x out, y = b + x W."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out).normal_(std=0.02))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)


class LoraConv1D(nn.Module):
    """PEFT's lora.Linear around a Conv1D (fan_in_fan_out = True), one adapter, unmerged."""

    def __init__(self, base, r, alpha):
        super().__init__()
        n_in, n_out = base.weight.shape
        self.base_layer = base
        self.lora_dropout = nn.Identity()  # lora_dropout = 0
        self.lora_A = nn.Linear(n_in, r, bias=False)
        self.lora_B = nn.Linear(r, n_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r

    def forward(self, x):
        result = self.base_layer(x)
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class NewGELU(nn.Module):
    """transformers' NewGELUActivation (gelu_new), written out in elementwise ops."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class TanhGELU(nn.Module):
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


class Attention(nn.Module):
    def __init__(self, d, n_head, n_pos):
        super().__init__()
        self.n_head = n_head
        self.c_attn = Conv1D(d, 3 * d)
        self.c_proj = Conv1D(d, d)
        self.register_buffer("causal", torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool)).view(1, 1, n_pos, n_pos),
                             persistent=False)

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.n_head
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, hd).permute(0, 2, 1, 3) for z in (q, k, v))
        w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)
        mask = self.causal[:, :, :t, :t]
        w = torch.where(mask, w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype))
        w = F.softmax(w, dim=-1)
        a = torch.matmul(w, v).permute(0, 2, 1, 3).contiguous().view(b, t, d)
        return self.c_proj(a)


class MLP(nn.Module):
    def __init__(self, d, gelu):
        super().__init__()
        self.c_fc = Conv1D(d, 4 * d)
        self.c_proj = Conv1D(4 * d, d)
        self.act = NewGELU() if gelu == "hf" else TanhGELU()

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d, n_head, n_pos, gelu):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, eps=1e-5)
        self.attn = Attention(d, n_head, n_pos)
        self.ln_2 = nn.LayerNorm(d, eps=1e-5)
        self.mlp = MLP(d, gelu)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 small: 12 blocks, n_embd 768, 12 heads, vocab 50257, n_positions 1024; LM head tied to wte."""

    def __init__(self, n_layer=12, d=768, n_head=12, vocab=50257, n_pos=1024, gelu="tanh"):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(n_pos, d)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)
        self.h = nn.ModuleList(Block(d, n_head, n_pos, gelu) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, eps=1e-5)

    def forward(self, idx, targets):
        t = idx.shape[1]
        pos = torch.arange(t, dtype=torch.long).unsqueeze(0)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied LM head
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def apply_lora(model, r, alpha):
    """Freeze the model and wrap the four projections of every block, as PEFT's target_modules would."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.h:
        block.attn.c_attn = LoraConv1D(block.attn.c_attn, r, alpha)
        block.attn.c_proj = LoraConv1D(block.attn.c_proj, r, alpha)
        block.mlp.c_fc = LoraConv1D(block.mlp.c_fc, r, alpha)
        block.mlp.c_proj = LoraConv1D(block.mlp.c_proj, r, alpha)


def main(a):
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = GPT2(n_layer=a.layers, gelu=a.gelu)
    if not a.full:
        apply_lora(model, a.rank, 2.0 * a.rank)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    idx = torch.randint(0, 50257, (a.batch, a.ctx))
    targets = torch.randint(0, 50257, (a.batch, a.ctx))

    def step():
        opt.zero_grad()
        loss = model(idx, targets)
        loss.backward()
        opt.step()
        return loss.item()

    load_avg_start = os.getloadavg()[0]
    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = a.batch * a.ctx
    res = {
        "contender": "torch",
        "mode": "full" if a.full else "lora",
        "torch_version": torch.__version__,
        "threads": a.threads,
        "torch_num_threads": torch.get_num_threads(),
        "ctx": a.ctx,
        "batch": a.batch,
        "layers": a.layers,
        "rank": None if a.full else a.rank,
        "gelu": a.gelu,
        "warmup": a.warmup,
        "steps": a.steps,
        "trainable_params": sum(p.numel() for p in params),
        "step_s_median": med,
        "step_s_min": min(times),
        "step_s_all": times,
        "tokens_per_s": tokens / med,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # ru_maxrss is KiB
        "load_avg_start": load_avg_start,  # the machine's 1-minute load average before the first step
    }
    print(f"torch {res['mode']}: threads {a.threads}, ctx {a.ctx}, batch {a.batch}: "
          f"step {1e3 * med:.0f} ms (median of {a.steps}), {res['tokens_per_s']:.1f} tokens/s, "
          f"peak RSS {res['peak_rss_mib'] / 1024:.2f} GiB, {res['trainable_params']:,} trainable parameters")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main(ARGS)
