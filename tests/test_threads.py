"""The thread policy (synfer/engine/threads.py): `auto` takes the free cores, one per torchrun worker, a user's OMP_NUM_THREADS."""
import logging

import pytest
from click.testing import CliRunner

from synfer.engine import threads as T


@pytest.mark.parametrize("env,cores,load,want", [
    ({}, 2, 0.1, 2),  # quiet 2-core machine: both cores
    ({}, 2, 2.3, 1),  # two busy processes beside us: one thread (never 0)
    ({}, 2, 9.0, 1),
    ({}, 16, 5.4, 11),  # 10.6 free cores, rounded
    ({}, 4, 0.0, 4),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 2, 0.0, 1),  # one thread per torchrun worker on 2 cores
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, 16, 0.0, 4),  # the workers of this machine share its cores
    ({"WORLD_SIZE": "3"}, 16, 1.0, 5),
    ({"OMP_NUM_THREADS": "3"}, 2, 9.0, 3),  # the user's explicit choice wins over auto
    ({"OMP_NUM_THREADS": "junk"}, 2, 0.0, 2),
])
def test_auto(env, cores, load, want):
    n, why = T.decide("auto", env=env, cores=cores, load=load)
    assert n == want, why
    assert why.startswith("auto: ")
    if "OMP_NUM_THREADS" in env and want == 3:
        assert "OMP_NUM_THREADS=3" in why
    elif "WORLD_SIZE" in env:
        assert "torchrun workers" in why


def test_auto_reads_affinity_and_load(monkeypatch):
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(T, "_runnable_others", lambda: None)  # no /proc: the 1-minute load average
    monkeypatch.setattr(T.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert T.decide("auto", env={}) == (2, "auto: 3 core(s) for this process, load 1.20, so 2 free")


def test_load_is_what_runs_now_not_the_lagging_average(monkeypatch, tmp_path):
    """Right after a job ends the 1-minute average still counts it; /proc/loadavg's running count does not."""
    reads = iter(["1.90 1.2 0.9 1/200 77\n", "1.90 1.2 0.9 1/200 77\n", "1.90 1.2 0.9 3/200 77\n", "1.90 1.2 0.9 1/200 77\n"])
    monkeypatch.setattr(T.Path, "read_text", lambda self: next(reads))
    monkeypatch.setattr(T.os, "getloadavg", lambda: (1.9, 1.2, 0.9))
    assert T._runnable_others(samples=4, interval=0) == 0.5  # (0 + 0 + 2 + 0) / 4 others runnable
    monkeypatch.setattr(T, "_runnable_others", lambda: 0.0)
    assert T.decide("auto", env={}, cores=2)[0] == 2  # idle now: both cores, though the average says 1.9
    monkeypatch.setattr(T, "_runnable_others", lambda: 2.0)  # two burners
    assert T.decide("auto", env={}, cores=2)[0] == 1


def test_explicit_number_wins_over_everything():
    assert T.decide(3, env={"OMP_NUM_THREADS": "1", "WORLD_SIZE": "2"}, cores=2, load=5) == (3, "threads=3 was set")
    assert T.decide("2", env={}, cores=8, load=0) == (2, "threads=2 was set")


@pytest.mark.parametrize("bad", [0, -1, "x", 1.5, True])
def test_bad_settings_say_what_is_expected(bad):
    with pytest.raises(ValueError, match="expected 'auto' or a positive integer"):
        T.parse(bad)


def test_configure_sets_torch_and_logs_why(monkeypatch, caplog):
    import torch

    before = torch.get_num_threads()
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(T, "_ours", {})
    monkeypatch.setattr(T, "_runnable_others", lambda: 0.0)
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    try:
        with caplog.at_level(logging.INFO, logger="synfer.engine.threads"):
            assert T.configure("auto") == 1
        assert torch.get_num_threads() == 1
        assert T.os.environ["OMP_NUM_THREADS"] == "1"  # child processes follow
        assert "threads: 1 (auto: 1 core(s) for this process, load 0.00, so 1 free)" in caplog.text
        # what configure wrote is not "the user's OMP_NUM_THREADS": auto decides again
        monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        assert T.decide("auto")[0] == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a value the user set stays
        monkeypatch.setattr(T, "_ours", {})
        assert T.configure(2) == 2 and T.os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_recipe_threads_field(registry, tmp_path):
    from synfer.engine.recipe import RecipeError, load_recipe

    p = tmp_path / "r.yaml"
    p.write_text("generator: {plugin: dummy}\n")
    assert load_recipe(p, registry=registry).threads == "auto"
    assert load_recipe(p, ["threads=2"], registry=registry).threads == 2
    with pytest.raises(RecipeError, match="threads=0: expected 'auto' or a positive integer"):
        load_recipe(p, ["threads=0"], registry=registry)


def test_train_threads_option_runs_before_the_subcommand_only(monkeypatch):
    """`synfer train --threads N CMD` applies N once, when CMD runs; a bad value is a usage error."""
    import click

    from synfer.commands.train import train_cli

    seen = []
    monkeypatch.setattr(T, "configure", lambda setting: seen.append(setting))

    @click.command("probe")
    def probe():
        seen.append("ran")

    train_cli.add_command(probe)
    try:
        r = CliRunner().invoke(train_cli, ["--threads", "2", "probe"])
        assert r.exit_code == 0, r.output
        assert seen == [2, "ran"]
        assert CliRunner().invoke(train_cli, ["probe", "--help"]).exit_code == 0 and seen == [2, "ran"]
        r = CliRunner().invoke(train_cli, ["--threads", "zero", "probe"])
        assert r.exit_code == 2 and "expected 'auto' or a positive integer" in r.output
        r = CliRunner().invoke(train_cli, ["probe"], env={"SYNFER_THREADS": "3"})
        assert r.exit_code == 0 and seen[-2:] == [3, "ran"]
    finally:
        train_cli.commands.pop("probe")
