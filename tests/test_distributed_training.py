"""Training with torch DDP: two real processes on the CPU (gloo), as torchrun would start them.

Each test starts its processes once and lets them do all of its work, since starting one costs
a few seconds; a deadline turns a deadlock between them into a failure instead of a hang.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from core.checkpoints import CHECKPOINT_FILE
from core.cli import main
from core.config import FitConfig
from core.data.tables import table_dataset
from core.distributed import ddp
from core.errors import Cancelled, ConfigError
from core.models.backbones import make_backbone
from core.models.objectives import make_objective
from core.models.ssl_encoder import SelfSupervisedEncoder
from core.progress import CancelToken, Monitor
from core.registry import Registry
from core.train import TrainConfig, train

PROCESSES = 2
DEADLINE_S = 120


# ----------------------------------------------------------------------------- launching


def _process(rank: int, port: int, worker, folder: Path, args: tuple) -> None:
    """One spawned process: torchrun's environment, its process group, ``worker``'s result saved.

    ``TORCHELASTIC_USE_AGENT_STORE`` tells the process group to join the store at ``MASTER_PORT``
    as a client, as under torchrun, instead of rank 0 binding that port itself.
    """
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(PROCESSES),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    with ddp.torchrun_process_group("cpu"):
        result = worker(*args)
    torch.save(result, folder / f"rank-{rank}.pt")


def in_processes(worker, folder: Path, *args) -> list:
    """``worker(*args)`` in each of ``PROCESSES`` processes training together; their results by rank.

    This process plays torchrun's agent: it hosts the rendezvous store on a port the system picks
    (port 0) and keeps it bound while the processes connect, so no port is chosen, released and
    then taken by someone else.
    """
    store = dist.TCPStore("127.0.0.1", 0, world_size=PROCESSES, is_master=True, wait_for_workers=False)
    context = mp.start_processes(_process, args=(store.port, worker, folder, args), nprocs=PROCESSES,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {PROCESSES} processes did not finish within {DEADLINE_S} s (a deadlock?)")
    return [torch.load(folder / f"rank-{rank}.pt", weights_only=False) for rank in range(PROCESSES)]


def state(*modules: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{key}": value.clone()
            for i, module in enumerate(modules) for key, value in module.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def rows(n: int, features: int = 8, seed: int = 0) -> np.ndarray:
    """``(n, features) float32`` rows near a plane, so there is structure to learn."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 2))
    return (latent @ rng.normal(size=(2, features)) + 0.05 * rng.normal(size=(n, features))).astype(np.float32)


# ----------------------------------------------------------------------------- gradient averaging


class Reconstruction(nn.Module):
    """Reconstruct each row from its embedding: no randomness, and a mean over the batch.

    With an encoder without BatchNorm, the mean of two half-batch gradients is then exactly the
    full batch's gradient, so DDP must reproduce one process's training. It records its batches
    and the seeds of the generators it was given.
    """

    def __init__(self, embedding_dim: int, features: int) -> None:
        super().__init__()
        self.head = nn.Linear(embedding_dim, features)
        self.batches: list[torch.Tensor] = []
        self.seeds: list[int] = []

    def loss(self, encoder, batch, generator):
        self.batches.append(batch.clone())
        self.seeds.append(generator.initial_seed())
        return F.mse_loss(self.head(encoder(batch)), batch)


def toy_model(features: int = 8) -> tuple[nn.Module, Reconstruction]:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, 4))
    return encoder, Reconstruction(4, features)


TOY_CONFIG = TrainConfig(epochs=4, batch_size=32, learning_rate=0.1, device="cpu")


def train_toy(data: np.ndarray) -> dict:
    encoder, objective = toy_model()
    result = train(encoder, objective, data, TOY_CONFIG)
    try:
        train(*toy_model(), data, TrainConfig(batch_size=3, device="cpu"))
        refusal = None
    except ConfigError as error:
        refusal = str(error)
    return {"losses": result.losses, "state": state(encoder, objective), "batches": objective.batches,
            "seeds": objective.seeds, "refusal": refusal}


def test_ddp_averaging_equals_training_on_the_whole_batch_in_one_process(tmp_path):
    data = rows(96)
    encoder, objective = toy_model()
    single = train(encoder, objective, data, TOY_CONFIG)
    ranks = in_processes(train_toy, tmp_path, data)

    assert ranks[0]["losses"] == ranks[1]["losses"]  # the step loss is averaged over the processes
    assert same_state(ranks[0]["state"], ranks[1]["state"])
    np.testing.assert_allclose(ranks[0]["losses"], single.losses, rtol=1e-5)
    expected = state(encoder, objective)
    for key, value in ranks[0]["state"].items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)
    assert single.losses[-1] < 0.5 * single.losses[0]

    # Every step, each process took its own half of the batch one process would have used.
    assert len(ranks[0]["batches"]) == len(objective.batches) == 4 * (96 // 32)
    for first, second, whole in zip(ranks[0]["batches"], ranks[1]["batches"], objective.batches):
        assert len(first) == len(second) == 16
        assert torch.equal(torch.cat((first, second)), whole)
    # Rank 0 draws the augmentations of one process; rank 1 draws its own, new every epoch too.
    assert ranks[0]["seeds"] == objective.seeds
    assert not set(ranks[1]["seeds"]) & set(objective.seeds) and len(set(ranks[1]["seeds"])) == 4

    assert "a batch of 3 over 2 processes leaves 1 sample(s) per process" in ranks[0]["refusal"]


# ----------------------------------------------------------------------------- checkpoints and resume


def contrastive_mlp(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The table encoder and objective of a self-supervised fit: BatchNorm and random views."""
    torch.manual_seed(seed)
    encoder = make_backbone("mlp", n_features=8)
    return encoder, make_objective("contrastive", encoder.embedding_dim, "table")


CONTRASTIVE_CONFIG = TrainConfig(epochs=4, batch_size=32, learning_rate=0.05, device="cpu")


def checkpoint_and_resume(data: np.ndarray, folder: Path) -> dict:
    """An uninterrupted run, then a run cancelled after 2 epochs and resumed, each checkpointing.

    Rank 1 is given folders of its own, which must stay untouched: rank 0's are the ones used.
    """
    mine = (lambda name: folder / name) if ddp.is_main() else (lambda name: folder / f"rank-1-{name}")
    encoder, objective = contrastive_mlp()
    straight = train(encoder, objective, data, CONTRASTIVE_CONFIG, checkpoint_dir=mine("straight"))
    expected = state(encoder, objective)

    token, steps_per_epoch = CancelToken(), len(data) // CONTRASTIVE_CONFIG.batch_size

    def stop_after_two_epochs(event):
        if event.done == 2 * steps_per_epoch:
            token.cancel()

    encoder, objective = contrastive_mlp()
    try:
        train(encoder, objective, data, CONTRASTIVE_CONFIG, checkpoint_dir=mine("resumed"),
              monitor=Monitor(stop_after_two_epochs, token))
    except Cancelled:
        cancelled_at = json.loads((folder / "resumed" / CHECKPOINT_FILE).read_text())["epoch"]
    else:
        cancelled_at = None
    encoder, objective = contrastive_mlp(seed=1 + ddp.rank())  # other weights: the checkpoint replaces them
    resumed = train(encoder, objective, data, CONTRASTIVE_CONFIG, checkpoint_dir=mine("resumed"))
    return {"straight": straight.losses, "expected": expected, "cancelled_at": cancelled_at,
            "resumed_from": resumed.resumed_from, "resumed": resumed.losses, "state": state(encoder, objective)}


def test_rank_0_checkpoints_once_and_every_process_resumes_from_it(tmp_path):
    data = rows(128)
    ranks = in_processes(checkpoint_and_resume, tmp_path, data, tmp_path)

    for result in ranks:
        assert result["cancelled_at"] == 2 and result["resumed_from"] == 2
        assert result["resumed"] == result["straight"] == ranks[0]["straight"]
        assert same_state(result["state"], result["expected"])  # a resumed run equals an uninterrupted one
    # Parameters and BatchNorm statistics alike end the same in both processes.
    assert same_state(ranks[0]["state"], ranks[1]["state"])
    assert ranks[0]["straight"][-1] < 0.8 * ranks[0]["straight"][0]

    checkpoint = json.loads((tmp_path / "straight" / CHECKPOINT_FILE).read_text())
    assert checkpoint["epoch"] == 4 and checkpoint["identity"]["processes"] == PROCESSES
    assert [p.name for p in (tmp_path / "straight").glob("epoch-*")] == ["epoch-0004"]
    assert not list(tmp_path.glob("rank-1-*"))


# ----------------------------------------------------------------------------- self-training


def retrain_on_own_masks(dataset, kept_by_rank: list[np.ndarray]) -> dict:
    """Fit a self-supervised table encoder, then retrain it on a kept mask that differs per process."""
    config = FitConfig(objective="contrastive", epochs=1, retrain_epochs=1, batch_size=16, device="cpu")
    encoder = SelfSupervisedEncoder(config.for_data("table"), "table").fit(dataset)
    events = []
    encoder.retrain(kept_by_rank[ddp.rank()], monitor=Monitor(events.append))
    return {"steps": [event.total for event in events], "state": state(encoder.model),
            "embeddings": encoder.embed_training_data()}


def test_every_process_retrains_on_rank_0_kept_samples(tmp_path):
    dataset = table_dataset(pd.DataFrame(rows(160)), tmp_path / "table.csv")
    kept_by_rank = [np.arange(160) < 128, np.arange(160) < 64]  # 4 steps of 32 on rank 0's, 2 on rank 1's
    ranks = in_processes(retrain_on_own_masks, tmp_path, dataset, kept_by_rank)

    assert ranks[0]["steps"] == ranks[1]["steps"] == [128 // 32] * (128 // 32)
    assert same_state(ranks[0]["state"], ranks[1]["state"])
    np.testing.assert_array_equal(ranks[0]["embeddings"], ranks[1]["embeddings"])


# ----------------------------------------------------------------------------- the command line


def test_fit_refuses_a_torchrun_launch_with_nothing_to_train(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))
    table = tmp_path / "table.csv"
    pd.DataFrame(rows(64)).to_csv(table, index=False)
    assert main(["fit", str(table), "--out", str(tmp_path / "run"), "--objective", "none"]) == 1
    assert "objective 'none'" in capsys.readouterr().err
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_fit_saves_one_run_that_scores(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    table = pd.DataFrame(np.vstack([rng.normal(size=(190, 8)), 6 * rng.normal(size=(10, 8))]),
                         columns=[f"f{i}" for i in range(8)])
    table["label"] = [0] * 190 + [1] * 10
    table.to_csv(tmp_path / "table.csv", index=False)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "REFINERY_HOME": str(tmp_path / "home"), "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # --standalone then binds port 0 once and shares it
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
               "-m", "core.cli", "fit", str(tmp_path / "table.csv"), "--out", str(tmp_path / "run"),
               "--objective", "contrastive", "--epochs", "3", "--retrain-epochs", "1", "--rounds", "2",
               "--device", "cpu", "--label-column", "label"]
    done = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run saved to") == 1  # rank 0 alone reports
    assert not list(scratch.glob("refinery-ddp-*"))  # rank 1's temporary run, registry and workspace are gone

    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))
    [record] = Registry().runs()
    assert record.status == "done" and Path(record.path) == tmp_path / "run" and record.metrics["auroc"] > 0.9
    assert main(["score", str(tmp_path / "run"), str(tmp_path / "table.csv"), "--out", str(tmp_path / "s.csv")]) == 0
    scores = pd.read_csv(tmp_path / "s.csv")
    assert len(scores) == 200 and scores["anomaly_score"].notna().all()
