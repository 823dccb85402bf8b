#!/usr/bin/env python3
"""An independent implementation of `gpt2_finetune eval` (docs/CONVENTIONS.md §eval) from the saved files
alone: a Hugging Face GPT-2 folder (config.json + model.safetensors), optionally a PEFT LoRA folder
(adapter_config.json + adapter_model.safetensors, merged as PEFT merges it), and a text file. GPT-2's
forward is written here in PyTorch (float64), not taken from the library; only byte-level models
(vocab_size 257: ids 0-255 are the bytes) are handled.

Usage: eval_reference.py --model DIR [--adapter DIR] --text FILE [--compare JSON_FILE] [--rtol 1e-4]
Prints {"tokens", "predicted", "loss_nats_per_token", "bits_per_byte"}. With --compare, exits 1 unless
the C++ program's JSON output (in that file) has the same counts and values within rtol.
"""
import argparse
import json
import math
import struct
import sys

import torch

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_safetensors(path):
    """{name: float64 tensor} from a safetensors file (8-byte little-endian header length, JSON, data)."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    data = blob[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = bytearray(data[begin:end])
        t = torch.frombuffer(raw, dtype=DTYPES[info["dtype"]]) if raw else torch.empty(0)
        out[name] = t.reshape(info["shape"]).to(torch.float64)
    return out


def load_model(model_dir, adapter_dir):
    cfg = json.load(open(f"{model_dir}/config.json"))
    w = {k[len("transformer."):] if k.startswith("transformer.") else k: v
         for k, v in read_safetensors(f"{model_dir}/model.safetensors").items()}
    if adapter_dir:
        acfg = json.load(open(f"{adapter_dir}/adapter_config.json"))
        ad = read_safetensors(f"{adapter_dir}/adapter_model.safetensors")
        for key, a in ad.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            b = ad[key.replace("lora_A", "lora_B")]
            r = a.shape[0]
            name = module.split(".")[-1]
            rank = acfg.get("rank_pattern", {}).get(name, r)
            alpha = acfg.get("alpha_pattern", {}).get(name, acfg["lora_alpha"])
            s = alpha / math.sqrt(rank) if acfg.get("use_rslora") else alpha / rank
            target = module[len("transformer."):] + ".weight"
            delta = s * (b @ a)  # out x in
            w[target] = w[target] + (delta.T if acfg.get("fan_in_fan_out") else delta)
    return cfg, w


def layer_norm(x, g, b, eps):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), g, b, eps)


def forward(cfg, w, ids):
    """Logits (T x V) of one window."""
    t, d, h = len(ids), cfg["n_embd"], cfg["n_head"]
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    x = w["wte.weight"][ids] + w["wpe.weight"][:t]
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    for layer in range(cfg["n_layer"]):
        p = f"h.{layer}."
        a = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        q, k, v = (a @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]).split(d, dim=1)
        q, k, v = (m.reshape(t, h, d // h).transpose(0, 1) for m in (q, k, v))
        att = (q @ k.transpose(1, 2)) / math.sqrt(d // h)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(0, 1).reshape(t, d)
        x = x + y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        m = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
        m = torch.nn.functional.gelu(m @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + m @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    x = layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], eps)
    return x @ w["wte.weight"].T


def evaluate(cfg, w, data):
    if cfg["vocab_size"] != 257:
        sys.exit("eval_reference.py: only byte-level models (vocab_size 257) are handled")
    ids = list(data)  # the byte tokenizer: id = byte
    n, width = len(ids), cfg["n_positions"]
    nats, predicted = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, width):
            window = ids[start : start + width]
            if len(window) < 2:
                break
            logp = forward(cfg, w, torch.tensor(window)).log_softmax(-1)
            nats -= logp[torch.arange(len(window) - 1), torch.tensor(window[1:])].sum().item()
            predicted += len(window) - 1
    loss = nats / predicted if predicted else 0.0
    return {"tokens": n, "predicted": predicted, "loss_nats_per_token": loss,
            "bits_per_byte": nats / math.log(2) / predicted if predicted else 0.0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--text", required=True)
    ap.add_argument("--compare")
    ap.add_argument("--rtol", type=float, default=1e-4)
    args = ap.parse_args()
    cfg, w = load_model(args.model, args.adapter)
    ours = evaluate(cfg, w, open(args.text, "rb").read())
    print(json.dumps(ours))
    if args.compare:
        theirs = json.loads(open(args.compare).read())
        ok = theirs["tokens"] == ours["tokens"] and theirs["predicted"] == ours["predicted"]
        for key in ("loss_nats_per_token", "bits_per_byte"):
            ok = ok and abs(theirs[key] - ours[key]) <= args.rtol * abs(ours[key])
        print("reference " + ("agrees" if ok else "DISAGREES") + f" with {args.compare}: {json.dumps(theirs)}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
