"""Check a bundle on ARM64 CPU kernels, on an x86 machine, under qemu user-mode emulation.

    python benchmarks/arm64_check.py models/vit-ti16              # the three CPU models
    python benchmarks/arm64_check.py models/vit-ti16 --cpu cortex-a72 --markdown arm64.md

Builds (once, cached in --workdir) an aarch64 sysroot from Debian's arm64 packages
(mmdebstrap --variant=extract: nothing is installed on the host, no binfmt_misc),
installs the aarch64 wheels of onnxruntime, openvino, numpy, pillow, onnx and click at
the versions this Python has, copies vit-deploy's own source (no torch), and runs
`vit-deploy check BUNDLE --golden GOLDEN` under `qemu-aarch64-static -cpu MODEL` for each
CPU model. INT8 artifacts are also compared with the same file run here on x86.

The golden outputs come from PyTorch on x86:
    vit-deploy check BUNDLE --max-images 4 --save-golden BUNDLE/golden.npz
Emulation is ~250x slower than the host in FP32 (vit-ti16: 6-8 s per image), so a
handful of images is the practical size. Exit 0 all pass, 1 any fails, 2 usage error.
"""
from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# What each model stands for (qemu's default `max` adds SME, which no edge chip has and
# which sent OpenVINO INT8 down a wrong path: never the default here).
CPU_MODELS = {
    "cortex-a72": "Raspberry Pi 4 class: NEON, no dot product",
    "neoverse-n1": "Pi 5 / Jetson Orin CPU / Graviton2 class: sdot, FP16 arithmetic",
    "max,sme=off,sve-default-vector-length=32": "Graviton3 class: SVE, i8mm, bf16",
}
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3.11", "libstdc++6", "libgomp1")
WHEELS = ("onnxruntime", "openvino", "numpy", "pillow", "onnx", "click")
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_27_aarch64", "manylinux_2_28_aarch64",
             "manylinux_2_31_aarch64", "manylinux_2_34_aarch64", "manylinux_2_35_aarch64", "linux_aarch64")
# Without manylinux_2_35 pip quietly picks openvino 2023.1: every platform tag up to
# bookworm's glibc (2.36) is listed.

# Linux's names for the AT_HWCAP / AT_HWCAP2 bits (arch/arm64/include/uapi/asm/hwcap.h),
# in /proc/cpuinfo's order.
HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop "
         "sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 "
          "i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32 smef16f32 smeb16f32 "
          "smef32f32 smefa64 wfxt ebf16 sveebf16 cssc rprfm sve2p1 sme2 sme2p1 smei16i32 smebi32i64 smeb16b16 "
          "smef16f16 mops hbc").split()

# Run inside the emulated Python: the hardware caps qemu gives the guest and its MIDR_EL1
# (`mrs x0, midr_el1; ret` called through ctypes), so the fake /proc/cpuinfo tells the
# runtimes exactly what the emulated CPU has. A cpuinfo that claims more (sdot on a72)
# ends in "Illegal instruction"; none at all makes `import onnxruntime` crash on the
# host's x86 one.
PROBE = r"""
import ctypes, json, mmap, struct
aux = dict(struct.iter_unpack('<QQ', open('/proc/self/auxv', 'rb').read()))
buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(struct.pack('<II', 0xd5380000, 0xd65f03c0))
midr = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))()
print(json.dumps({"hwcap": aux.get(16, 0), "hwcap2": aux.get(26, 0), "midr": midr}))
"""

# Run inside the emulated Python: the logits of some artifacts on the golden inputs, to
# compare with the same files run on x86.
DUMP = r"""
import sys, numpy as np
from vit_deploy.bundle import Bundle
from vit_deploy.backends import open_runner
bundle, golden, out, precisions = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
backends = sys.argv[5].split(",") if len(sys.argv) > 5 and sys.argv[5] else None
b = Bundle.open(bundle)
x = np.load(golden, allow_pickle=False)["inputs"]
got = {}
for a in b.artifacts:
    if a["precision"] in precisions and (not backends or a["backend"] in backends):
        with open_runner(b, a, threads=1) as r:
            got[a["backend"] + "-" + a["precision"]] = np.concatenate([r(x[i:i + 1]) for i in range(len(x))])
np.savez(out, **got)
"""


class UsageError(Exception):
    """One line for the user, exit 2."""


def golden_command(bundle: Path) -> str:
    return f"vit-deploy check {bundle} --max-images 4 --save-golden {bundle / 'golden.npz'}"


def require_tools() -> tuple[str, str]:
    qemu, mm = shutil.which("qemu-aarch64-static"), shutil.which("mmdebstrap")
    if not qemu or not mm:
        missing = [p for p, t in (("qemu-user-static", qemu), ("mmdebstrap", mm)) if not t]
        raise UsageError(f"needs the Debian package(s) {' and '.join(missing)}: "
                         "apt-get install -y qemu-user-static mmdebstrap")
    return qemu, mm


def parse_cpus(spec: list[str] | None) -> list[str]:
    cpus = spec or list(CPU_MODELS)
    for c in cpus:
        if c not in CPU_MODELS:
            raise UsageError(f"unknown CPU model '{c}': choose from {', '.join(CPU_MODELS)}")
    return cpus


def host_versions() -> dict[str, str]:
    """The versions to install in the sysroot: those of this Python's environment."""
    out = {}
    for d in WHEELS:
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            raise UsageError(f"{d} is not installed here: the sysroot gets the versions this Python has "
                             "(pip install 'vit-deploy[openvino]')") from None
    return out


def _run(cmd: list[str], log: Path, **kw) -> None:
    with open(log, "ab") as f:
        f.write(("\n$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if r.returncode:
        raise RuntimeError(f"{cmd[0]} failed (exit {r.returncode}); see {log}")


def build_sysroot(workdir: Path, mmdebstrap: str) -> Path:
    """Debian's arm64 python and C++ runtime, extracted (about 5 s, 80 MB). Rebuilt only when
    the package list changes; built beside the old one and swapped in whole."""
    root, stamp = workdir / "sysroot", f"{DEBIAN_SUITE} {' '.join(DEBIAN_PACKAGES)}"
    if (root / ".vit-deploy-stamp").is_file() and (root / ".vit-deploy-stamp").read_text() == stamp:
        return root
    tmp = workdir / "sysroot.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"building the aarch64 sysroot ({DEBIAN_SUITE}: {', '.join(DEBIAN_PACKAGES)}) in {root}", flush=True)
    _run([mmdebstrap, "--variant=extract", "--architectures=arm64", "--include=" + ",".join(DEBIAN_PACKAGES),
          DEBIAN_SUITE, str(tmp)], workdir / "build.log")
    (tmp / ".vit-deploy-stamp").write_text(stamp)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def guest_python(root: Path) -> tuple[Path, str]:
    found = sorted(root.glob("usr/bin/python3.[0-9]*"))
    found = [p for p in found if p.name.replace("python", "").replace(".", "").isdigit()]
    if not found:
        raise RuntimeError(f"{root}: no python3.X in the sysroot")
    return found[-1], found[-1].name.replace("python", "")


def install_wheels(workdir: Path, py_version: str, versions: dict[str, str]) -> Path:
    """The aarch64 wheels at this environment's versions, with their dependencies pinned to
    this environment's versions where it has them, into a --target directory."""
    site = workdir / f"site-py{py_version}"
    stamp = json.dumps(versions, sort_keys=True)
    if (site / ".vit-deploy-stamp").is_file() and (site / ".vit-deploy-stamp").read_text() == stamp:
        return site
    print("installing aarch64 wheels: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    wheels, tmp = workdir / "wheels", workdir / "site.tmp"
    shutil.rmtree(wheels, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    constraints = workdir / "constraints.txt"
    constraints.write_text("".join(f"{d.metadata['Name']}=={d.version}\n" for d in importlib.metadata.distributions()
                                   if d.metadata["Name"] and d.metadata["Name"].lower().replace("_", "-") != "vit-deploy"))
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    tags = plat + ["--python-version", py_version, "--implementation", "cp", "--only-binary=:all:"]
    pip = [sys.executable, "-m", "pip"]
    _run(pip + ["download", "-q", *tags, "-c", str(constraints), "-d", str(wheels)]
         + [f"{k}=={v}" for k, v in versions.items()], workdir / "build.log")
    _run(pip + ["install", "-q", "--no-deps", "--no-index", *tags, "--target", str(tmp)]
         + [str(p) for p in sorted(wheels.glob("*.whl"))], workdir / "build.log")
    (tmp / ".vit-deploy-stamp").write_text(stamp)
    shutil.rmtree(site, ignore_errors=True)
    tmp.rename(site)
    return site


def copy_source(workdir: Path) -> Path:
    """vit-deploy's package as it is in this checkout (a fresh copy every run)."""
    src = workdir / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(REPO / "vit_deploy", src / "vit_deploy", ignore=shutil.ignore_patterns("__pycache__"))
    return src


class Guest:
    """An aarch64 Python under qemu-aarch64-static with one CPU model."""

    def __init__(self, qemu: str, root: Path, python: Path, paths: list[Path], cpu: str):
        self.qemu, self.root, self.python, self.paths, self.cpu = qemu, root, python, paths, cpu

    def command(self, args: list[str]) -> list[str]:
        return [self.qemu, "-cpu", self.cpu, "-L", str(self.root), str(self.python), *args]

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "OMP_", "VIRTUAL_ENV"))}
        env.update({"PYTHONPATH": os.pathsep.join(str(p) for p in self.paths), "PYTHONNOUSERSITE": "1",
                    "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"})
        return env

    def run(self, args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(args), env=self.env(), capture_output=True, text=True, timeout=timeout)


def write_cpu_identity(root: Path, probe: dict) -> None:
    """/proc/cpuinfo and the midr_el1 files the runtimes read, for the emulated CPU.
    qemu's -L serves SYSROOT/proc/cpuinfo in place of the host's x86 one."""
    features = [n for i, n in enumerate(HWCAP) if probe["hwcap"] >> i & 1]
    features += [n for i, n in enumerate(HWCAP2) if probe["hwcap2"] >> i & 1]
    midr = probe["midr"]
    block = (f"BogoMIPS\t: 50.00\nFeatures\t: {' '.join(features)}\nCPU implementer\t: {midr >> 24 & 0xff:#04x}\n"
             f"CPU architecture: 8\nCPU variant\t: {midr >> 20 & 0xf:#x}\nCPU part\t: {midr >> 4 & 0xfff:#05x}\n"
             f"CPU revision\t: {midr & 0xf}\n")
    n = os.cpu_count() or 1
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "cpuinfo").unlink(missing_ok=True)  # a new file: copies made with hard links stay apart
    (root / "proc" / "cpuinfo").write_text("".join(f"processor\t: {i}\n{block}\n" for i in range(n)))
    cpus = root / "sys" / "devices" / "system" / "cpu"
    shutil.rmtree(cpus, ignore_errors=True)
    for i in range(n):
        d = cpus / f"cpu{i}" / "regs" / "identification"
        d.mkdir(parents=True)
        (d / "midr_el1").write_text(f"0x{midr:016x}\n")
    (cpus / "possible").write_text(f"0-{n - 1}\n")
    (cpus / "online").write_text(f"0-{n - 1}\n")


def probe_cpu(guest: Guest) -> dict:
    r = guest.run(["-c", PROBE], timeout=300)
    if r.returncode:
        raise RuntimeError(f"probing {guest.cpu} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout)


def copy_bundle(bundle: Path, dest: Path) -> Path:
    """`check` records its result in the manifest: the emulated runs write to a copy, hard
    links where possible (the manifest is replaced, never written in place)."""
    shutil.rmtree(dest, ignore_errors=True)

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(bundle, dest, copy_function=link, ignore=shutil.ignore_patterns(".*"))
    (dest / "manifest.json").unlink()
    shutil.copy2(bundle / "manifest.json", dest / "manifest.json")
    return dest


def x86_logits(bundle: Path, golden: Path, precisions: list[str], backends: list[str] | None) -> dict:
    import numpy as np

    from vit_deploy.backends import open_runner
    from vit_deploy.bundle import Bundle
    b = Bundle.open(bundle)
    x = np.load(golden, allow_pickle=False)["inputs"]
    out = {}
    for a in b.artifacts:
        if a["precision"] in precisions and (not backends or a["backend"] in backends):
            with open_runner(b, a, threads=1) as r:
                out[f"{a['backend']}-{a['precision']}"] = np.concatenate([r(x[i:i + 1]) for i in range(len(x))])
    return out


def check_on(guest: Guest, bundle: Path, golden: Path, out: Path, fp32_max_abs: float, backends,
             x86: dict, x86_min_cosine: float) -> list[dict]:
    """`vit-deploy check --golden` under emulation, then INT8 against x86; one row per artifact."""
    import numpy as np

    from vit_deploy.parity import cosine
    report_path = out / "report.json"
    report_path.unlink(missing_ok=True)
    args = ["-m", "vit_deploy.cli", "check", str(bundle), "--golden", str(golden), "--threads", "1",
            "--json", str(report_path), "--set", f"fp32.max_abs={fp32_max_abs}"]
    if backends:
        args += ["--backends", ",".join(backends)]
    t = time.perf_counter()
    r = guest.run(args)
    (out / "check.log").write_text(r.stdout + r.stderr)
    if not report_path.is_file():
        last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        return [{"cpu": guest.cpu, "artifact": "(all)", "passed": False, "failed": [f"crashed: {last}"],
                 "seconds": round(time.perf_counter() - t, 1)}]
    rows = []
    for res in json.loads(report_path.read_text())["results"]:
        rows.append({"cpu": guest.cpu, "artifact": res["artifact"], "precision": res["precision"],
                     **{k: res["metrics"][k] for k in ("max_abs", "min_cosine", "top1_agreement")},
                     "passed": res["passed"], "failed": list(res["failed"]), "seconds": res["seconds"]})
    if x86:
        dump = out / "int8_logits.npz"
        dump.unlink(missing_ok=True)
        r = guest.run(["-c", DUMP, str(bundle), str(golden), str(dump), "int8", ",".join(backends or [])])
        got = dict(np.load(dump)) if dump.is_file() else {}
        for row in rows:
            if row["artifact"] in x86:
                if row["artifact"] not in got:
                    row["passed"] = False
                    row["failed"].append("no output for the x86 comparison: " + (r.stderr.strip().splitlines() or ["?"])[-1])
                    continue
                c = float(cosine(x86[row["artifact"]], got[row["artifact"]]).min())
                row["x86_min_cosine"] = c
                if c < x86_min_cosine:
                    row["passed"] = False
                    row["failed"].append(f"min cosine vs x86 {c:.5f} < {x86_min_cosine}")
    return rows


def format_rows(rows: list[dict], markdown: bool) -> str:
    head = ["CPU model", "artifact", "max abs", "min cosine", "top-1 agreement", "INT8 min cosine vs x86",
            "result", "seconds"]
    body = []
    for r in rows:
        num = lambda k, f: f.format(r[k]) if k in r else "-"  # noqa: E731
        body.append([r["cpu"], r["artifact"], num("max_abs", "{:.2e}"), num("min_cosine", "{:.5f}"),
                     num("top1_agreement", "{:.3f}"), num("x86_min_cosine", "{:.5f}"),
                     "PASS" if r["passed"] else "FAIL: " + "; ".join(r["failed"]), f"{r['seconds']:.1f}"])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [head] + body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--golden", type=Path, default=None, help="default: BUNDLE/golden.npz")
    ap.add_argument("--cpu", action="append", default=None, help=f"repeatable; default all: {', '.join(CPU_MODELS)}")
    ap.add_argument("--backends", default=None, help="only these backends (comma-separated)")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("VIT_DEPLOY_CACHE", Path.home() / ".cache" / "vit-deploy")) / "arm64")
    ap.add_argument("--fp32-max-abs", type=float, default=1e-4, help="FP32 gate against the golden outputs")
    ap.add_argument("--x86-min-cosine", type=float, default=0.999, help="INT8 gate against the same file on x86")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    a = ap.parse_args(argv)
    try:
        cpus = parse_cpus(a.cpu)
        bundle = a.bundle.resolve()
        if not (bundle / "manifest.json").is_file():
            raise UsageError(f"{a.bundle}: not a vit-deploy bundle (no manifest.json)")
        golden = (a.golden or bundle / "golden.npz").resolve()
        if not golden.is_file():
            raise UsageError(f"{a.bundle} has no golden outputs ({golden}): make them on x86 from PyTorch with "
                             f"`{golden_command(a.bundle)}`")
        qemu, mm = require_tools()
        versions = host_versions()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    backends = a.backends.split(",") if a.backends else None
    workdir = a.workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    lock = open(workdir / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"error: another ARM64 check is running in {workdir} (one fake /proc/cpuinfo per sysroot); "
              "wait for it or pass another --workdir", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    root = build_sysroot(workdir, mm)
    python, py_version = guest_python(root)
    site = install_wheels(workdir, py_version, versions)
    src = copy_source(workdir)
    work_bundle = copy_bundle(bundle, workdir / "bundle")
    x86 = x86_logits(bundle, golden, ["int8"], backends)
    rows = []
    for cpu in cpus:
        print(f"[{time.perf_counter() - t0:6.0f} s] {cpu} ({CPU_MODELS[cpu]})", flush=True)
        guest = Guest(qemu, root, python, [src, site], cpu)
        probe = probe_cpu(guest)
        write_cpu_identity(root, probe)
        out = workdir / "runs" / cpu.split(",")[0]
        out.mkdir(parents=True, exist_ok=True)
        rows += check_on(guest, work_bundle, golden, out, a.fp32_max_abs, backends, x86, a.x86_min_cosine)
        print(format_rows([r for r in rows if r["cpu"] == cpu], markdown=False), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "bundle": str(a.bundle), "golden": str(golden),
            "images": len(next(iter(x86.values()))) if x86 else None,
            "versions": {**versions, "qemu": qemu_version(qemu), "debian": DEBIAN_SUITE, "python": py_version},
            "seconds": round(time.perf_counter() - t0, 1), "passed": all(r["passed"] for r in rows), "rows": rows}
    print()
    print(format_rows(rows, markdown=False))
    print(footer(meta))
    if a.json:
        a.json.write_text(json.dumps(meta, indent=1))
    if a.markdown:
        a.markdown.write_text(format_rows(rows, markdown=True) + "\n\n" + footer(meta) + "\n")
    return 0 if meta["passed"] else 1


def footer(meta: dict) -> str:
    v = meta["versions"]
    return (f"{meta['date']}, {meta['images']} images of {meta['golden'].split('/')[-1]} ({meta['bundle']}), "
            f"qemu {v['qemu']} user mode on x86, Debian {v['debian']} python {v['python']}, onnxruntime "
            f"{v['onnxruntime']}, openvino {v['openvino']}, numpy {v['numpy']}; {meta['seconds']:.0f} s in all")


def qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.split()
    return out[2] if len(out) > 2 else "?"


if __name__ == "__main__":
    sys.exit(main())
