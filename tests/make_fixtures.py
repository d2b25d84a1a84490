#!/usr/bin/env python3
"""Builds the test fixtures: tiny random CLIP checkpoints in the real HuggingFace format,
reference embeddings computed by `transformers`, and reference token ids from OpenAI's
tokenizer (the copy shipped in `open_clip_torch`).

Run once (outputs are committed under tests/fixtures/):
    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install torch transformers open_clip_torch safetensors pillow
    /tmp/pyref/bin/python tests/make_fixtures.py [--shared ../shared] [--open-clip]

`--open-clip` writes only the open_clip fixtures: tiny random models made by open_clip itself
(`open_clip.create_model(..., pretrained=None)` with tiny custom configs), saved as open_clip
saves them, with open_clip's own embeddings of rs-mini as the reference.
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from open_clip.tokenizer import tokenize
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

ROOT = Path(__file__).resolve().parent
FIXTURES = ROOT / "fixtures"

MODELS = {
    # ViT-B/32-like geometry (32 px patches) at tiny widths, 256 px input: the lossless
    # 256 px UCM TIFFs need no resize, so they compare exactly (JPEG decoders differ slightly).
    "tiny-clip": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, hidden_act="quick_gelu"),
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=2, image_size=256, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=24, eps=1e-5),
    # Exercises the other knobs: exact GELU, other eps, 64 px images, 16 px patches, 3 layers.
    "tiny-clip-gelu": dict(
        text=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=3, hidden_act="gelu"),
        vision=dict(hidden_size=40, intermediate_size=80, num_hidden_layers=3,
                    num_attention_heads=2, image_size=64, patch_size=16, hidden_act="gelu"),
        projection_dim=16, eps=1e-6),
}

EXTRA_TEXTS = [
    "",
    "A  Baseball   STADIUM, surrounded by green trees!",
    "storage tanks &amp; blue-roofed buildings",
    "café à côté d'un pont — naïve résumé",
    " ".join(["many buildings and green trees are around a playground"] * 12),  # > 77 tokens
]


def fnv1a32(ids):
    h = 0x811C9DC5
    for token in ids:
        for byte in int(token).to_bytes(4, "little", signed=True):
            h ^= byte
            h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def token_ids(texts):
    """Reference ids, unpadded: SOT ... EOT (truncated to 77 keeping EOT)."""
    out = []
    for row in tokenize(texts, context_length=77).tolist():
        eot = row.index(49407)
        out.append(row[: eot + 1])
    return out


def perturb(model, generator):
    """Random weights everywhere (random init leaves LayerNorms at identity and biases at 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(math.log(1 / 0.07))
            elif "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))
            elif p.ndim >= 2 and "embedding" not in name:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def build_model(name, spec, seed):
    text = dict(spec["text"], vocab_size=49408, max_position_embeddings=77,
                layer_norm_eps=spec["eps"], bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    vision = dict(spec["vision"], layer_norm_eps=spec["eps"])
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection_dim"])
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    perturb(model, torch.Generator().manual_seed(seed))
    out = FIXTURES / name
    model.save_pretrained(out, safe_serialization=True)
    return model


def normalize(x):
    return (x / x.norm(dim=-1, keepdim=True)).tolist()


def image_row(filename, image, size, pixels, emb):
    """One image of a reference: its preprocessed pixels (sampled) and normalized embedding."""
    flat = pixels[0].flatten().numpy().astype(np.float64)
    return {
        "file": filename,
        "resized": image.size != (size, size),
        "pixel_mean": float(flat.mean()),
        "pixel_samples": [float(v) for v in flat[::997]],
        "embedding": normalize(emb)[0],
    }


def reference_embeddings(name, model, shared):
    size = model.config.vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    dataset = json.loads((shared / "data/rs-mini/dataset.json").read_text())
    images = []
    for entry in dataset["images"]:
        path = shared / "data/rs-mini/images" / entry["filename"]
        image = Image.open(path).convert("RGB")
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            emb = model.get_image_features(pixel_values=pixels)
            emb = getattr(emb, "pooler_output", emb)
        images.append(image_row(entry["filename"], image, size, pixels, emb))
    texts = [s["raw"] for e in dataset["images"] for s in e["sentences"]] + EXTRA_TEXTS
    ids = token_ids(texts)
    padded = torch.zeros(len(ids), 77, dtype=torch.long)
    for row, seq in enumerate(ids):
        padded[row, : len(seq)] = torch.tensor(seq)
    with torch.no_grad():
        emb = model.get_text_features(input_ids=padded)
        emb = getattr(emb, "pooler_output", emb)
    text_rows = [{"text": t, "ids": i, "embedding": e} for t, i, e in zip(texts, ids, normalize(emb))]
    (FIXTURES / name / "reference.json").write_text(
        json.dumps({"image_size": size, "images": images, "texts": text_rows}))


def caption_sets(shared):
    """Every caption of ../shared/data/captions, in file order (the Rust test reads the same)."""
    sets = {}
    for name in ["ucm_dataset.json", "sydney_dataset.json"]:
        data = json.loads((shared / "data/captions" / name).read_text())
        sets[name] = [s["raw"] for image in data["images"] for s in image["sentences"]]
    for name in ["rsicd_train.jsonl", "rsicd_valid.jsonl", "rsicd_test.jsonl"]:
        rows = [json.loads(line) for line in (shared / "data/captions" / name).read_text().splitlines() if line.strip()]
        sets[name] = [c for row in rows for c in row["captions"]]
    return sets


OPEN_CLIP_MODELS = {
    # ViT-B/16-style geometry (16 px patches), OpenAI's QuickGELU, 256 px input (the lossless
    # UCM TIFFs compare exactly); open_clip's hub layout: open_clip_config.json + weights.
    "openclip-b16-quickgelu": dict(
        embed_dim=24, quick_gelu=True,
        vision_cfg=dict(image_size=256, layers=2, width=48, patch_size=16, head_width=24),
        text_cfg=dict(context_length=77, vocab_size=49408, width=16, heads=1, layers=2)),
    # ViT-L/14-style geometry (14 px patches, 224 px input), exact GELU, 3 layers; saved as a
    # training checkpoint: {"epoch", "state_dict"} with DDP's `module.` prefix, in f16. Heads follow
    # open_clip's convention (64-wide; the weights do not record them), so that rsitrd can
    # infer the architecture from the shapes.
    "openclip-l14-gelu": dict(
        embed_dim=16, quick_gelu=False,
        vision_cfg=dict(image_size=224, layers=3, width=64, patch_size=14, head_width=64),
        text_cfg=dict(context_length=77, vocab_size=49408, width=16, heads=1, layers=3)),
}


def perturb_open_clip(model, generator):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(math.log(1 / 0.07))
            elif ".ln_" in name or name.startswith("ln_") or "ln_final" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))
            elif p.ndim >= 2 and "embedding" not in name:
                fan_in = int(np.prod(p.shape[1:])) if name not in ("visual.proj", "text_projection") else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def open_clip_fixtures(shared):
    import tempfile
    import open_clip
    configs = Path(tempfile.mkdtemp())
    for seed, (name, cfg) in enumerate(OPEN_CLIP_MODELS.items()):
        (configs / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(configs / f"{name}.json")
        torch.manual_seed(100 + seed)
        model = open_clip.create_model(name, pretrained=None).eval()
        perturb_open_clip(model, torch.Generator().manual_seed(100 + seed))
        out = FIXTURES / name
        out.mkdir(parents=True, exist_ok=True)
        state = model.state_dict()
        if name == "openclip-b16-quickgelu":
            (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}, indent=2))
            torch.save(state, out / "open_clip_pytorch_model.bin")
        else:
            # Half precision, as many published open_clip checkpoints are; the reference is
            # computed with the same f16-rounded weights in f32.
            half = {k: v.half() for k, v in state.items()}
            torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in half.items()}},
                       out / "checkpoint.pt")
            model.load_state_dict({k: v.float() for k, v in half.items()})
        size = cfg["vision_cfg"]["image_size"]
        preprocess = open_clip.image_transform(size, is_train=False)
        dataset = json.loads((shared / "data/rs-mini/dataset.json").read_text())
        images = []
        for entry in dataset["images"]:
            image = Image.open(shared / "data/rs-mini/images" / entry["filename"]).convert("RGB")
            pixels = preprocess(image).unsqueeze(0)
            with torch.no_grad():
                emb = model.encode_image(pixels)
            images.append(image_row(entry["filename"], image, size, pixels, emb))
        # Identical pixels whatever the size: a formula both sides evaluate in f32.
        c, y, x = torch.meshgrid(torch.arange(3), torch.arange(size), torch.arange(size), indexing="ij")
        synthetic = torch.sin(0.01 * (c * 7919 + y * 131 + x).to(torch.float32)).unsqueeze(0)
        with torch.no_grad():
            synthetic_embedding = normalize(model.encode_image(synthetic))[0]
        texts = [s["raw"] for e in dataset["images"] for s in e["sentences"]] + EXTRA_TEXTS
        ids = token_ids(texts)
        with torch.no_grad():
            emb = model.encode_text(open_clip.tokenize(texts))
        text_rows = [{"text": t, "ids": i, "embedding": e} for t, i, e in zip(texts, ids, normalize(emb))]
        params = sum(p.numel() for p in model.parameters())
        (out / "reference.json").write_text(json.dumps(
            {"image_size": size, "images": images, "texts": text_rows, "params": params,
             "synthetic_pixels_embedding": synthetic_embedding}))
        print("wrote", name, params, "parameters")
    # open_clip's parameter counts of the published architectures (for `rsitrd params`).
    for arch in ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]:
        model = open_clip.create_model(arch, pretrained=None)
        print(arch, sum(p.numel() for p in model.parameters()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default=str(ROOT.parent.parent / "shared"))
    parser.add_argument("--open-clip", action="store_true")
    args = parser.parse_args()
    shared = Path(args.shared)
    if args.open_clip:
        open_clip_fixtures(shared)
        return
    # ViT-B/32 geometry, config only (for `rsitrd params` and benchmarks): transformers'
    # CLIPConfig defaults are openai/clip-vit-base-patch32's.
    (FIXTURES / "vit-b-32").mkdir(parents=True, exist_ok=True)
    CLIPConfig(projection_dim=512).to_json_file(FIXTURES / "vit-b-32" / "config.json")
    for seed, (name, spec) in enumerate(MODELS.items()):
        model = build_model(name, spec, seed + 1)
        reference_embeddings(name, model, shared)
        print("wrote", name)
    # The same gelu model as a PyTorch pickle checkpoint (`pytorch_model.bin`, the format of
    # older hub repositories), to test that loading path.
    bin_dir = FIXTURES / "tiny-clip-gelu-bin"
    bin_dir.mkdir(exist_ok=True)
    model = CLIPModel.from_pretrained(FIXTURES / "tiny-clip-gelu")
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((FIXTURES / "tiny-clip-gelu" / "config.json").read_text())
    # One "# FILE" line per caption file, then one line per caption: FNV-1a-32 of its ids
    # (little-endian i32) in hex.
    lines = []
    for name, captions in caption_sets(shared).items():
        lines.append(f"# {name}")
        for i in range(0, len(captions), 4096):
            lines.extend(f"{fnv1a32(ids):08x}" for ids in token_ids(captions[i : i + 4096]))
    (FIXTURES / "tokenizer-reference.tsv").write_text("\n".join(lines) + "\n")
    print("wrote", len(lines) - 5, "caption token hashes")


if __name__ == "__main__":
    main()
