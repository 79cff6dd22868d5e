"""scripts/soak: SIGKILL a real pretraining run again and again, resume it, and check that nothing is ever lost."""
import hashlib
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BIN = os.environ.get("SELFSUP_BIN", "target/release/selfsup")
KILLS = int(os.environ.get("KILLS", "20"))
SHORT = bool(os.environ.get("SOAK_SHORT"))
SEED = int(os.environ.get("SEED", str(int(time.time()))))
IN_WRITE_MIN = max(2 if SHORT else 5, KILLS // 4) if KILLS >= 4 else 0
EVERY = 3  # train.checkpoint_every_steps
PAUSE_MS = 40  # per stage of a checkpoint write (test-only fault injection)
RANDOM_STEPS = 2 * EVERY  # a random kill lands at most this many steps past the process's first step
# 12 steps per epoch; enough epochs that every kill lands in training, however fast or slow the machine: a kill inside
# a write is at most 3 checkpoint intervals in, a random one at most RANDOM_STEPS (both counted from the live output).
EPOCHS = max(3, -(-(IN_WRITE_MIN * (3 * EVERY + 1) + (KILLS - IN_WRITE_MIN) * (RANDOM_STEPS + 1)) // 12))
SETS = {
    "data.limit": "384",
    "train.batch_size": "32",
    "model.backbone.width": "8",
    "train.epochs": str(EPOCHS),
    "eval.at_end": "false",
    "eval.knn_every": "0",
    "train.log_every": "1",
    "train.progress_every_s": "0",
    "train.checkpoint_every": "0",
    "train.checkpoint_every_steps": str(EVERY),
    "train.keep_last": "3",
    "optimizer.warmup_epochs": "0.5",
}
ARGS = [a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]
STEP_RE = re.compile(rb"step (\d+)/(\d+)")


def command(out, mode):
    base = [BIN, "pretrain", "--out", out]
    if mode == "resume":
        return base + ["--resume"]
    return base + ["--config", "byol-fmnist-tiny"] + ARGS + (["--overwrite"] if mode == "overwrite" else [])


class Tail:
    """Reads a process's stderr as it comes: the whole text, the last step reported and when each step came."""

    def __init__(self, pipe):
        self.text, self.steps, self.times = bytearray(), [], []
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe):
        for line in iter(pipe.readline, b""):
            self.text += line
            for m in STEP_RE.finditer(line):
                self.steps.append(int(m.group(1)))
                self.times.append(time.time())

    def last(self):
        return self.steps[-1] if self.steps else None

    def done(self):
        self.thread.join()
        return bytes(self.text)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verified(ckpt):
    """True when every file SHA256SUMS lists matches and the manifest lists the required files."""
    try:
        lines = open(os.path.join(ckpt, "SHA256SUMS")).read().splitlines()
        listed = {}
        for line in lines:
            want, name = line.split("  ", 1)
            listed[name] = want
        required = {"model.safetensors", "optimizer.safetensors", "state.json", "config.toml"}
        return required <= set(listed) and all(sha256(os.path.join(ckpt, n)) == w for n, w in listed.items())
    except (OSError, ValueError):
        return False


def latest(run):
    """(name, step) that LATEST names, None without LATEST; raises if it dangles."""
    path = os.path.join(run, "checkpoints", "LATEST")
    if not os.path.exists(path):
        return None
    name = open(path).read().strip()
    ckpt = os.path.join(run, "checkpoints", name)
    import json

    return name, json.load(open(os.path.join(ckpt, "state.json")))["step"], ckpt


def writing(run, pid):
    """The temporary entries of process `pid` (a checkpoint it is writing or pruning), not a dead one's."""
    d = os.path.join(run, "checkpoints")
    try:
        return {n for n in os.listdir(d) if n.startswith(".") and (f".tmp-{pid}" in n or f".del-{pid}" in n)}
    except FileNotFoundError:
        return set()


def main():
    rng = random.Random(SEED)
    root = os.environ.get("OUT") or tempfile.mkdtemp(prefix="selfsup-soak-")
    ref, run = os.path.join(root, "uninterrupted"), os.path.join(root, "killed")
    for d in (ref, run):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    p = subprocess.Popen(command(ref, "fresh"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail = Tail(p.stderr)
    if p.wait() != 0:
        sys.exit(f"the uninterrupted run failed:\n{tail.done().decode(errors='replace')}")
    tail.done()
    ref_seconds = time.time() - t0
    ref_weights = open(os.path.join(latest(ref)[2], "model.safetensors"), "rb").read()
    # Start-up and step time as this machine runs them now (from the live progress lines, not guessed).
    startup = tail.times[0] - t0 if tail.times else 1.0
    step_seconds = (tail.times[-1] - tail.times[0]) / max(1, len(tail.times) - 1) if tail.times else 0.1
    print(f"uninterrupted run: {12 * EPOCHS} steps in {ref_seconds:.1f} s (start-up {startup:.1f} s, "
          f"{step_seconds * 1000:.0f} ms a step); seed {SEED}; folder {root}", flush=True)

    env = dict(os.environ, SELFSUP_FAULT_SLOW_CHECKPOINT_MS=str(PAUSE_MS))
    kills = writes = dangling = corrupt = checked = 0
    lost = []
    finished = False
    while kills < KILLS:
        mode = "resume" if latest(run) else ("overwrite" if os.path.exists(run) else "fresh")
        want_write = writes < IN_WRITE_MIN and (kills % 2 == 0 or KILLS - kills <= IN_WRITE_MIN - writes)
        p = subprocess.Popen(command(run, mode), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        tail = Tail(p.stderr)
        start = time.time()
        # A random kill: anywhere from start-up to a few checkpoint intervals in, and never more than RANDOM_STEPS
        # steps past this process's first one (a slow start-up elsewhere must not turn into a long run here).
        deadline = start + (60 if want_write else rng.uniform(0.3, startup + RANDOM_STEPS * step_seconds))
        first = None
        caught = False
        # Inside this process's 1st, 2nd or 3rd checkpoint write, so that kills land in writes of later checkpoints.
        nth, seen = rng.randint(1, 3), set()
        while p.poll() is None and time.time() < deadline:
            if not want_write and tail.steps:
                first = tail.steps[0] if first is None else first
                if tail.last() >= first + RANDOM_STEPS:
                    break
            now = writing(run, p.pid) if want_write else set()
            fresh = {n.split(".tmp-")[0].split(".del-")[0] for n in now} - seen
            seen |= fresh
            if want_write and fresh and len(seen) >= nth:
                time.sleep(rng.uniform(0, 6 * PAUSE_MS / 1000))  # land anywhere in the write's stages
                caught = p.poll() is None
                break
            time.sleep(0.001)
        if p.poll() is not None:
            err = tail.done()
            if p.returncode != 0:
                sys.exit(f"the run failed by itself (exit {p.returncode}):\n{err.decode(errors='replace')}")
            finished = True
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        err = tail.done()
        kills += 1
        writes += caught and want_write
        steps = [int(m.group(1)) for m in STEP_RE.finditer(err)]
        reached = steps[-1] if steps else None
        # Invariants after a kill: LATEST names a complete, verified checkpoint; every checkpoint folder verifies.
        try:
            at = latest(run)
        except (OSError, ValueError):
            at, dangling = None, dangling + 1
        if at and not verified(at[2]):
            dangling += 1
        ckdir = os.path.join(run, "checkpoints")
        for name in sorted(os.listdir(ckdir)) if os.path.isdir(ckdir) else []:
            path = os.path.join(ckdir, name)
            if name.startswith(".") or not os.path.isdir(path):
                continue
            checked += 1
            corrupt += not verified(path)
        base = at[1] if at else 0
        if reached is not None:
            lost.append(max(0, reached - base))
        where = "inside a checkpoint write" if caught and want_write else "at a random moment"
        print(f"kill {kills:2d} {where:26s} after {time.time() - start:5.2f} s: reached step {reached}, "
              f"LATEST {at[0] if at else None} (step {base})", flush=True)
    if not finished:
        mode = "resume" if latest(run) else "overwrite"
        r = subprocess.run(command(run, mode), capture_output=True)
        if r.returncode != 0:
            sys.exit(f"the final resume failed:\n{r.stderr.decode(errors='replace')}")
    weights = open(os.path.join(latest(run)[2], "model.safetensors"), "rb").read()
    same = weights == ref_weights
    worst = max(lost) if lost else 0
    print(f"kills: {kills} ({writes} inside a checkpoint write)")
    print(f"checkpoints verified: {checked}")
    print(f"dangling LATEST: {dangling}")
    print(f"corrupt checkpoints: {corrupt}")
    median = statistics.median(lost) if lost else 0
    print(f"work lost per kill: median {median} steps, max {worst} (checkpoint interval {EVERY} steps)")
    print(f"bit-identical: {'yes' if same else 'NO'}")
    if kills < KILLS:
        print(f"the run finished after {kills} of {KILLS} kills: too short for this many")
    ok = same and dangling == 0 and corrupt == 0 and worst <= EVERY and writes >= IN_WRITE_MIN and kills == KILLS
    if not os.environ.get("OUT"):
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
