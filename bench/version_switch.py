#!/usr/bin/env python3
"""How to switch adapter versions on a Qdrant server (issue #11, docs/qdrant.md): a new
collection per version behind an alias (what rsitrd does), or Qdrant's named-vector
backfill (new vectors `image_v2`/`text_v2` written into the existing points). Same points,
same batches, same server, back to back.

usage: bench/version_switch.py [--url http://127.0.0.1:6333] [--points 4000] [--dim 512]
needs: pip install qdrant-client
"""
import argparse, json, os, random, time
from qdrant_client import QdrantClient, models


def unit(rng, dim):
    v = [rng.gauss(0, 1) for _ in range(dim)]
    n = sum(x * x for x in v) ** 0.5
    return [x / n for x in v]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:6333")
    p.add_argument("--points", type=int, default=4000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    client = QdrantClient(url=args.url, timeout=120, check_compatibility=False)
    rng = random.Random(7)
    base = f"switchbench_{os.getpid()}"
    # Half image points, half caption points, as rsitrd writes them.
    ids = list(range(args.points))
    vectors = [unit(rng, args.dim) for _ in ids]
    payload = lambda i: {"sample_id": f"{i:064x}", "kind": "image" if i % 2 else "caption",
                         "split": "train", "adapter_version": 1, "captions": [f"caption {i}"]}
    name = lambda i: "image" if i % 2 else "text"
    vectors_config = {n: models.VectorParams(size=args.dim, distance=models.Distance.COSINE)
                      for n in ("image", "text")}

    def fill(collection, version):
        for start in range(0, len(ids), args.batch):
            chunk = ids[start:start + args.batch]
            client.upsert(collection, wait=True, points=[
                models.PointStruct(id=i, vector={name(i): vectors[i]}, payload=payload(i))
                for i in chunk])

    v1 = f"{base}_v1"
    client.create_collection(v1, vectors_config=vectors_config)
    fill(v1, 1)
    client.update_collection_aliases(change_aliases_operations=[
        models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=v1, alias_name=base))])
    report = {"points": args.points, "dim": args.dim, "server": client.info().version}

    # A: a new collection behind the alias (rsitrd's way).
    t = time.time()
    v2 = f"{base}_v2"
    client.create_collection(v2, vectors_config=vectors_config)
    for field in ("sample_id", "kind", "split"):
        client.create_payload_index(v2, field, models.PayloadSchemaType.KEYWORD, wait=True)
    fill(v2, 2)
    client.update_collection_aliases(change_aliases_operations=[
        models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=v2, alias_name=base))])
    client.delete_collection(v1)
    report["alias_s"] = round(time.time() - t, 2)

    # B: named-vector backfill into the live collection.
    t = time.time()
    for n in ("image", "text"):
        client.create_vector_name(v2, f"{n}_v3", models.DenseVectorNameConfig(
            dense=models.DenseVectorConfig(size=args.dim, distance=models.Distance.COSINE)), wait=True)
    for start in range(0, len(ids), args.batch):
        chunk = ids[start:start + args.batch]
        client.update_vectors(v2, wait=True, points=[
            models.PointVectors(id=i, vector={f"{name(i)}_v3": vectors[i]}) for i in chunk])
    # Clients must now search `image_v3`/`text_v3`; the old vectors go point by point.
    for n in ("image", "text"):
        client.delete_vector_name(v2, n, wait=True)
    report["backfill_s"] = round(time.time() - t, 2)
    client.delete_collection(v2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
