import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


@pytest.fixture
def registry():
    """The installed plugins plus the dummy test stages."""
    import dummy_plugins

    from synfer.engine.registry import Registry

    reg = Registry()
    reg.load_entrypoints()
    reg.add(dummy_plugins, provider="tests")
    return reg


@pytest.fixture
def one_thread():
    """One torch thread: the machine is shared, and single-thread results are the most reproducible."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny SD model folder (test_generator.tiny), shared by a test module."""
    from test_generator import tiny

    path = tmp_path_factory.mktemp("m")
    tiny().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A random 16 px tiny-cnn guidance classifier over affectnet8, shared by a test module."""
    import torch

    from synfer_plugins.tiny_cnn import TinyCNN, build_net, save_net

    path = tmp_path_factory.mktemp("clf")
    torch.manual_seed(0)
    save_net(build_net(8, width=8, size=16), path, {"num_outputs": 8, "width": 8, "size": 16, "label_space": "affectnet8"})
    return TinyCNN(TinyCNN.Config(weights=str(path)))


def make_dist(tmp: Path, name: str, entry_points: dict[str, str]) -> Path:
    """A fake installed distribution (dist-info on a PYTHONPATH entry) declaring synfer entry points."""
    info = tmp / f"{name.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[synfer]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    return tmp


def subprocess_env(*paths) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in paths] + [env.get("PYTHONPATH", "")])
    return env


# The repo's out/ belongs to `make demo` and the user: the suite never reads or writes it. A snapshot of its
# entries (path, size, mtime) at the start is compared at the end, so a test that writes there fails the run.
def _out_snapshot():
    out = HERE.parent / "out"
    if not out.exists():
        return None
    return sorted((str(p.relative_to(out)), p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file())


def pytest_sessionstart(session):
    session.config._synfer_out = _out_snapshot()
    # A suite started in the background (as CI may start it) has SIGINT ignored, so no Ctrl-C can reach it; the tests of
    # what a Ctrl-C does inside a plugin need Python's own handler, as a terminal gives it. (The ignored case has its test.)
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session, exitstatus):
    before, after = session.config._synfer_out, _out_snapshot()
    if before != after:
        changed = sorted(set(after or []) ^ set(before or []))[:5]
        session.config.get_terminal_writer().line(f"\nERROR: the suite changed the repo's out/ folder (tests must write to tmp_path): {changed}", red=True)
        session.exitstatus = 1
