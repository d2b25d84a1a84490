#!/usr/bin/env python3
"""The PyTorch side of `rsitrd bench`: the same work on the same machine, for a ratio.

CLIP ViT-B/32 with random weights (transformers `CLIPModel`), the MRS-Adapter shared by all
24 blocks in parallel with the MLP, embedding-dropout views and the HMMC loss, Adam on the
adapter only (frozen backbone) — the reference implementation's framework. Prints one JSON
object like `rsitrd bench`.

    /tmp/pyref/bin/python tests/bench_torch.py --batch-size 16 --iterations 3 [--captions FILE]
"""
import argparse
import json
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.tokenizer import tokenize
from transformers import CLIPConfig, CLIPModel


class MRSAdapter(nn.Module):
    def __init__(self, d_vision=768, d_text=512, bottleneck=64, shared=64, p=0.5):
        super().__init__()
        self.visual_down = nn.Linear(d_vision, bottleneck)
        self.text_down = nn.Linear(d_text, bottleneck)
        self.visual_up = nn.Linear(bottleneck, d_vision - shared)
        self.text_up = nn.Linear(bottleneck, d_text - shared)
        self.shared_up = nn.Linear(bottleneck, shared)
        self.dropout = nn.Dropout(p)
        for layer in [self.visual_up, self.text_up, self.shared_up]:
            nn.init.zeros_(layer.weight)
        for layer in [self.visual_down, self.text_down, self.visual_up, self.text_up, self.shared_up]:
            nn.init.zeros_(layer.bias)

    def forward(self, x, modality):
        down, up = (self.visual_down, self.visual_up) if modality == "v" else (self.text_down, self.text_up)
        h = self.dropout(F.relu(down(x)))
        return torch.cat([up(h), self.shared_up(h)], dim=-1)


class Stash(nn.Module):
    """Wraps layer_norm2 to remember its input (the post-attention residual stream)."""
    def __init__(self, norm):
        super().__init__()
        self.norm, self.x = norm, None

    def forward(self, x):
        self.x = x
        return self.norm(x)


class AdaptedMlp(nn.Module):
    def __init__(self, mlp, stash, adapter, modality):
        super().__init__()
        self.mlp, self.stash, self.adapter, self.modality = mlp, stash, [adapter], modality

    def forward(self, h):
        return self.mlp(h) + self.adapter[0](self.stash.x, self.modality)

    def __getattr__(self, name):
        # open_clip reads attributes of the MLP (its `c_fc` weight dtype).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.mlp, name)


EMB_DROPOUT = {"p": 0.0}


def install(model, adapter):
    for modality, tower in [("v", model.vision_model), ("t", model.text_model)]:
        for layer in tower.encoder.layers:
            stash = Stash(layer.layer_norm2)
            layer.layer_norm2 = stash
            layer.mlp = AdaptedMlp(layer.mlp, stash, adapter, modality)
    drop = lambda module, inputs, output: F.dropout(output, EMB_DROPOUT["p"], True) if EMB_DROPOUT["p"] else output
    model.text_model.embeddings.register_forward_hook(drop)
    model.vision_model.pre_layrnorm.register_forward_hook(drop)


def freeze_all_but(model, adapter):
    """The frozen backbone: only the adapter trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter.parameters():
        p.requires_grad_(True)


def timer(iterations):
    """Seconds of `iterations` calls of a body after one warm-up call."""
    def timed(body):
        body(0)
        start = time.perf_counter()
        for i in range(1, iterations + 1):
            body(i)
        return time.perf_counter() - start
    return timed


def hinge(a, b, margin=0.2):
    s = a @ b.t()
    d = s.diag().view(-1, 1)
    eye = torch.eye(s.size(0), dtype=torch.bool)
    cost_s = (margin + s - d).clamp(min=0).masked_fill(eye, 0)
    cost_im = (margin + s - d.t()).clamp(min=0).masked_fill(eye, 0)
    return cost_s.max(1)[0].sum() + cost_im.max(0)[0].sum()


def hmmc_step(encode_image, encode_text, images, input_ids, optimizer):
    """One PE-RSITR step: plain and embedding-dropout views, the three HMMC terms, Adam."""
    EMB_DROPOUT["p"] = 0.0
    img, txt = encode_image(images), encode_text(input_ids)
    EMB_DROPOUT["p"] = 0.2
    img_aug, txt_aug = encode_image(images), encode_text(input_ids)
    EMB_DROPOUT["p"] = 0.0
    loss = hinge(img, txt) + hinge(img, img_aug) + hinge(txt, txt_aug)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def features(out):
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--captions")
    parser.add_argument("--only", default="image,text,train,matmul,linear")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--arch", default=None,
                        help="an open_clip architecture (ViT-B-16, ViT-L-14, ...) built by open_clip "
                             "itself, instead of transformers' ViT-B/32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    captions = ["many buildings and green trees are around a playground"]
    if args.captions:
        data = json.load(open(args.captions))
        captions = [s["raw"] for image in data["images"] for s in image["sentences"]]
    n = args.batch_size
    batch = lambda i: [captions[(i * n + j) % len(captions)] for j in range(n)]

    def ids(texts):
        full = tokenize(texts, context_length=77)
        length = int((full == 49407).int().argmax(dim=1).max()) + 1  # trim padding like rsitrd
        return full[:, :length]

    if args.arch:
        return open_clip_bench(args, captions, batch, ids)
    model = CLIPModel(CLIPConfig(projection_dim=512)).eval()
    adapter = MRSAdapter()
    install(model, adapter)
    freeze_all_but(model, adapter)
    report = {"device": "cpu", "framework": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
              "batch_size": n, "iterations": args.iterations}
    only = args.only.split(",")

    timed = timer(args.iterations)

    rate = lambda seconds: args.iterations * n / seconds
    pixels = torch.randn(n, 3, 224, 224)
    if "image" in only:
        with torch.no_grad():
            report["image_embed_per_s"] = rate(timed(lambda i: features(model.get_image_features(pixel_values=pixels))))
    if "text" in only:
        with torch.no_grad():
            report["text_embed_per_s"] = rate(timed(lambda i: features(model.get_text_features(input_ids=ids(batch(i))))))
    if "train" in only:
        model.train()
        optimizer = torch.optim.Adam(adapter.parameters(), lr=2e-4)

        def step(i):
            input_ids = ids(batch(i))
            images = torch.randn(n, 3, 224, 224)
            hmmc_step(lambda x: features(model.get_image_features(pixel_values=x)),
                      lambda t: features(model.get_text_features(input_ids=t)),
                      images, input_ids, optimizer)

        seconds = timed(step)
        report["train_pairs_per_s"] = rate(seconds)
        report["train_step_ms"] = 1000 * seconds / args.iterations
    if "matmul" in only:
        # The vision MLP's first matmul at the training shape, like `rsitrd bench`'s matmul.
        vision = model.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        m, k, w = 2 * n * tokens, vision.hidden_size, vision.intermediate_size
        lhs, rhs = torch.randn(m, k), torch.randn(k, w)

        def products(i):
            for _ in range(10):
                lhs @ rhs

        report["matmul_gflops"] = 2 * m * k * w * 10 * args.iterations / timed(products) / 1e9
    if "linear" in only:
        # The vision MLP's frozen layers at the training shape, like `rsitrd bench`'s linear:
        # x W1 + b1, h W2 + b2 and the input gradients dY W (what autograd runs for them).
        vision = model.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        m, width, inner = 2 * n * tokens, vision.hidden_size, vision.intermediate_size
        x, grad_hidden, grad_out = torch.randn(m, width), torch.randn(m, inner), torch.randn(m, width)
        w1, b1 = torch.randn(inner, width) * 0.02, torch.randn(inner) * 0.02
        w2, b2 = torch.randn(width, inner) * 0.02, torch.randn(width) * 0.02

        def layers(i):
            F.linear(F.linear(x, w1, b1), w2, b2)
            grad_out @ w2
            grad_hidden @ w1

        report["linear_gflops"] = 4 * 2 * m * width * inner * args.iterations / timed(layers) / 1e9
    report["trainable_params"] = sum(p.numel() for p in adapter.parameters())
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(report))


def install_open_clip(model, adapter):
    """The same adapter placement in open_clip's blocks: x + attn(ln_1 x), then
    x + mlp(ln_2 x) + adapter(x); embedding dropout on ln_pre's output and the text input."""
    for modality, blocks in [("v", model.visual.transformer.resblocks), ("t", model.transformer.resblocks)]:
        for block in blocks:
            stash = Stash(block.ln_2)
            block.ln_2 = stash
            block.mlp = AdaptedMlp(block.mlp, stash, adapter, modality)
    drop = lambda module, inputs, output: F.dropout(output, EMB_DROPOUT["p"], True) if EMB_DROPOUT["p"] else output
    model.visual.ln_pre.register_forward_hook(drop)
    model.transformer.register_forward_pre_hook(
        lambda module, args: (F.dropout(args[0], EMB_DROPOUT["p"], True),) + tuple(args[1:]) if EMB_DROPOUT["p"] else None)


def open_clip_bench(args, captions, batch, ids):
    import open_clip
    n = args.batch_size
    model = open_clip.create_model(args.arch, pretrained=None).eval()
    vision_width = model.visual.conv1.weight.shape[0]
    text_width = model.token_embedding.weight.shape[1]
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    adapter = MRSAdapter(d_vision=vision_width, d_text=text_width)
    install_open_clip(model, adapter)
    freeze_all_but(model, adapter)
    report = {"device": "cpu", "framework": f"torch {torch.__version__} + open_clip {open_clip.__version__}",
              "arch": args.arch, "threads": torch.get_num_threads(), "batch_size": n,
              "iterations": args.iterations}
    only = args.only.split(",")

    timed = timer(args.iterations)

    rate = lambda seconds: args.iterations * n / seconds
    norm = lambda x: F.normalize(x, dim=-1)
    pixels = torch.randn(n, 3, size, size)
    if "image" in only:
        with torch.no_grad():
            report["image_embed_per_s"] = rate(timed(lambda i: norm(model.encode_image(pixels))))
    if "text" in only:
        with torch.no_grad():
            report["text_embed_per_s"] = rate(timed(lambda i: norm(model.encode_text(ids_full(batch(i))))))
    if "train" in only:
        model.train()
        optimizer = torch.optim.Adam(adapter.parameters(), lr=2e-4)

        def step(i):
            input_ids = ids_full(batch(i))
            images = torch.randn(n, 3, size, size)
            hmmc_step(lambda x: norm(model.encode_image(x)), lambda t: norm(model.encode_text(t)),
                      images, input_ids, optimizer)

        seconds = timed(step)
        report["train_pairs_per_s"] = rate(seconds)
        report["train_step_ms"] = 1000 * seconds / args.iterations
    report["trainable_params"] = sum(p.numel() for p in adapter.parameters())
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(report))


def ids_full(texts):
    # open_clip's text tower takes the full context (its causal mask is built for 77).
    return tokenize(texts, context_length=77)


if __name__ == "__main__":
    main()
