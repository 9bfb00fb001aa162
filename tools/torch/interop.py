#!/usr/bin/env python3
"""PyTorch's side of checkpoint interop, with the PyTorch peer's models (torch_d2l.py).

usage: interop.py export MODEL OUT.safetensors [--seed S]
           the peer's freshly built MODEL (torch.manual_seed(S), then the peer's initialisation),
           saved as a PyTorch user saves one: safetensors.torch.save_file(net.state_dict(), OUT),
           no metadata
       interop.py eval CHECKPOINT MODEL [--resize R] [--max-examples N]
           a checkpoint (ptxgrad's, or a plain state_dict) loaded into the peer's MODEL with
           load_state_dict(strict=True) and its test accuracy, computed as `ptxgrad eval` does
           (the first N test images, /255, bilinear resize with align_corners=False to R, the
           checkpoint's recorded resolution by default, else the model's recipe)
       interop.py roundtrip MODEL CHECKPOINT [--ptxgrad BIN] [--max-examples N] [--resize R]
           both directions against the ptxgrad binary (default target/release/ptxgrad), on the CPU:
           (1) ptxgrad's CHECKPOINT: `ptxgrad eval --json` beside `eval` above; (2) the peer's
           freshly built MODEL, exported: `ptxgrad eval`, `predict` and `train --resume` (one
           epoch of N examples) on the plain file, and the trained file back into PyTorch.
           Exits 1 if the accuracies or any predicted class differ, or a load fails
Common options: --peer PATH (torch_d2l.py; default $PTXGRAD_PEER, else ../shared/peer/torch_d2l.py),
--data-dir DIR (default $PTXGRAD_DATA, else data/fashion-mnist). Prints one JSON line: the
accuracy, the number of images, the first image's logits and every predicted class (one digit
per image, in order).
"""
import argparse, importlib.util, json, os, shutil, subprocess, sys, tempfile

import torch, torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def peer_module(path):
    spec = importlib.util.spec_from_file_location("torch_d2l", path)
    if spec is None or not os.path.exists(path):
        sys.exit(f"interop.py: no PyTorch peer at {path} (give --peer PATH or set PTXGRAD_PEER)")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def export(peer, args):
    torch.manual_seed(args.seed)
    net = peer.build(args.model, "cpu")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, args.out)
    print(json.dumps({"exported": args.out, "model": args.model, "seed": args.seed,
                      "tensors": len(net.state_dict())}))


def evaluate(peer, args):
    print(json.dumps(peer_eval(peer, args.checkpoint, args.model, args.resize, args.max_examples, args.data_dir)))


def peer_eval(peer, checkpoint, model, resize, max_examples, data_dir):
    with safe_open(checkpoint, "pt") as f:
        meta = f.metadata() or {}
    if "model" in meta and meta["model"] != model:
        sys.exit(f"interop.py: {checkpoint} holds {meta['model']}, not {model}")
    size = resize or int(meta.get("resolution", 0)) or peer.RECIPES[model][2]
    net = peer.build(model, "cpu")
    net.load_state_dict(load_file(checkpoint), strict=True)  # every name, every shape
    net.eval()
    X = torch.from_numpy(peer.load(f"{data_dir}/t10k-images-idx3-ubyte.gz", True).copy())
    Y = torch.from_numpy(peer.load(f"{data_dir}/t10k-labels-idx1-ubyte.gz", False).copy()).long()
    if max_examples:
        X, Y = X[:max_examples], Y[:max_examples]
    correct, classes, first = 0, [], None
    with torch.no_grad():
        for i in range(0, len(X), 250):
            x = X[i:i + 250].float() / 255
            if size != 28:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            logits = net(x)
            pred = logits.argmax(1)
            correct += (pred == Y[i:i + 250]).sum().item()
            classes += [str(int(p)) for p in pred]
            if first is None:
                first = [round(v, 6) for v in logits[0].tolist()]
    return {"model": model, "checkpoint": checkpoint, "resolution": size, "examples": len(X),
            "correct": correct, "accuracy": correct / len(X), "first_logits": first,
            "predicted": "".join(classes)}


def ptxgrad_json(args, *cmd):
    """The JSON lines of one ptxgrad command on the CPU; exits with its stderr if it fails."""
    full = [args.ptxgrad, *cmd, "--device", "cpu", "--data-dir", args.data_dir]
    run = subprocess.run(full, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"interop.py: {' '.join(full)} failed ({run.returncode}):\n{run.stderr}")
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def compare(what, ours, theirs):
    """One line comparing ptxgrad's eval or predict JSON lines (predict: its first images only)
    with peer_eval's; True if they agree."""
    images = [r for r in ours if r.get("kind") == "image"]
    predicted = "".join(str(r["predicted"]) for r in images)
    differ = sum(a != b for a, b in zip(predicted, theirs["predicted"]))
    logit_diff = max(abs(a - b) for a, b in zip(images[0]["logits"], theirs["first_logits"]))
    if len(predicted) < theirs["examples"]:  # predict: compare those images' accuracy
        correct = sum(r["predicted"] == r["label"] for r in images)
        theirs = dict(theirs, examples=len(predicted),
                      correct=sum(r["label"] == int(c) for r, c in zip(images, theirs["predicted"])))
        theirs["accuracy"] = theirs["correct"] / len(predicted)
        totals = {"correct": correct, "accuracy": correct / len(predicted)}
    else:
        totals = next(r for r in ours if r.get("kind") == "totals")
    same = totals["correct"] == theirs["correct"] and differ == 0 and len(predicted) == theirs["examples"]
    print(json.dumps({"check": what, "ptxgrad_accuracy": totals["accuracy"], "pytorch_accuracy": theirs["accuracy"],
                      "examples": theirs["examples"], "predictions_differing": differ,
                      "first_image_max_logit_diff": round(logit_diff, 7), "agree": same}))
    return same


def roundtrip(peer, args):
    n = ["--max-examples", str(args.max_examples)] if args.max_examples else []
    size = ["--resize", str(args.resize)] if args.resize else []
    ok = compare("ptxgrad checkpoint -> PyTorch", ptxgrad_json(args, "eval", "--checkpoint", args.checkpoint, "--json", *n),
                 peer_eval(peer, args.checkpoint, args.model, args.resize, args.max_examples, args.data_dir))
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, f"{args.model}.pytorch.safetensors")
        torch.manual_seed(0)
        net = peer.build(args.model, "cpu")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, plain)
        theirs = peer_eval(peer, plain, args.model, args.resize, args.max_examples, args.data_dir)
        ok &= compare("PyTorch state_dict -> ptxgrad eval", ptxgrad_json(args, "eval", "--checkpoint", plain, "--json", *n, *size), theirs)
        ok &= compare("PyTorch state_dict -> ptxgrad predict", ptxgrad_json(args, "predict", "--checkpoint", plain, "--json", *n, *size), theirs)
        # train --resume continues the plain file in place: train a copy for one short epoch.
        trained = os.path.join(tmp, f"{args.model}.resumed.safetensors")
        shutil.copy(plain, trained)
        epoch = ptxgrad_json(args, "train", "--checkpoint", trained, "--resume", "--epochs", "1", "--max-examples",
                             str(args.max_examples or 512), "--quiet", "--json", "/dev/stdout", *size)
        ok &= compare("PyTorch state_dict -> ptxgrad train --resume -> PyTorch",
                      ptxgrad_json(args, "eval", "--checkpoint", trained, "--json", *n),
                      peer_eval(peer, trained, args.model, args.resize, args.max_examples, args.data_dir))
        print(json.dumps({"check": "train --resume from the PyTorch file", "epochs": [
            {k: r[k] for k in ("epoch", "loss", "test_acc")} for r in epoch if r.get("kind") == "epoch"]}))
    sys.exit(0 if ok else 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", default=os.environ.get("PTXGRAD_PEER", "../shared/peer/torch_d2l.py"))
    ap.add_argument("--data-dir", default=os.environ.get("PTXGRAD_DATA", "data/fashion-mnist"))
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("model")
    ex.add_argument("out")
    ex.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval")
    ev.add_argument("checkpoint")
    ev.add_argument("model")
    ev.add_argument("--resize", type=int, default=0)
    ev.add_argument("--max-examples", type=int, default=0)
    rt = sub.add_parser("roundtrip")
    rt.add_argument("model")
    rt.add_argument("checkpoint")
    rt.add_argument("--ptxgrad", default="target/release/ptxgrad")
    rt.add_argument("--resize", type=int, default=0)
    rt.add_argument("--max-examples", type=int, default=0)
    args = ap.parse_args()
    peer = peer_module(args.peer)
    if args.command == "export":
        if args.model not in peer.RECIPES:
            sys.exit(f"interop.py: unknown model {args.model}; the peer has {', '.join(sorted(peer.RECIPES))}")
        export(peer, args)
    elif args.command == "eval":
        evaluate(peer, args)
    else:
        roundtrip(peer, args)


if __name__ == "__main__":
    main()
