"""Label calibration by ensemble voting (paper 4.1 and 4.4).

FERAnno and any number of experts vote on each sample's preassigned label. Each
member predicts in its own label space; predictions are mapped into the recipe's
space, and a class a member cannot see gets no vote from it. Each member judges its own copies of
the samples, so none can change what is written or what the next one sees. Pure numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from synfer.contract import labels as L
from synfer.contract.contracts import calling, check_untouched, expert_probs, private_samples


@dataclass
class Member:
    name: str
    weight: float
    label_space: str
    predict: Callable  # (list[GeneratedSample]) -> (N, classes) probabilities (or logits) in label_space
    stage: Any = None  # the plugin behind `predict`, named in contract errors
    outputs: str = "probabilities"  # or "logits": softmax applied here


@dataclass
class Vote:
    label: int  # index in the recipe's space
    soft: np.ndarray
    agreement: float
    kept: bool


def _mixture(probs: np.ndarray, sees: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted average per class over the members that can see the class. probs (M, C)."""
    w = weights[:, None] * sees
    num = (w * probs).sum(0)
    den = w.sum(0)
    avg = np.where(den > 0, num / np.maximum(den, 1e-12), 0.0)
    return avg / max(avg.sum(), 1e-12)


def _agreement(probs, sees, weights, label) -> float:
    voters = sees[:, label] > 0
    if not voters.any() or weights[voters].sum() == 0:
        return 0.0
    return float(weights[voters & (probs.argmax(1) == label)].sum() / weights[voters].sum())


def vote_paper(pre: int, probs, sees, weights, cfg) -> Vote:
    """Paper 4.1: if the experts' vote disagrees with the preassigned label, replace the label
    by the argmax of the experts' average prediction; the average is kept as the soft label."""
    avg = _mixture(probs, sees, weights)
    choice = int(avg.argmax())
    if choice == pre:
        return Vote(pre, avg, _agreement(probs, sees, weights, pre), True)
    if avg[choice] < cfg.threshold:  # not confident enough to relabel: drop
        return Vote(pre, avg, _agreement(probs, sees, weights, pre), False)
    return Vote(choice, avg, _agreement(probs, sees, weights, choice), True)


def vote_soft_average(pre: int, probs, sees, weights, cfg) -> Vote:
    """The preassigned one-hot joins the average with weight `prior_weight`; label = argmax."""
    onehot = np.eye(probs.shape[1])[pre][None]
    allp = np.concatenate([onehot, probs])
    alls = np.concatenate([np.ones_like(onehot), sees])
    allw = np.concatenate([[cfg.prior_weight], weights])
    avg = _mixture(allp, alls, allw)
    label = int(avg.argmax())
    kept = label == pre or avg[label] >= cfg.threshold
    return Vote(label if kept else pre, avg, _agreement(probs, sees, weights, label), kept)


def vote_majority(pre: int, probs, sees, weights, cfg) -> Vote:
    """Each member votes its argmax (weighted); the preassigned label votes with `prior_weight`."""
    tally = np.zeros(probs.shape[1])
    tally[pre] += cfg.prior_weight
    for p, w in zip(probs, weights):
        tally[int(p.argmax())] += w
    best = tally.max()
    label = pre if tally[pre] == best else int(tally.argmax())
    share = tally / max(tally.sum(), 1e-12)
    kept = label == pre or share[label] >= cfg.threshold
    return Vote(label if kept else pre, share, _agreement(probs, sees, weights, label), kept)


VOTE_RULES = {"paper": vote_paper, "soft-average": vote_soft_average, "majority": vote_majority}


class ExpertEnsemble:
    """Runs every member on a batch and applies a vote rule per sample."""

    def __init__(self, members: list[Member], label_space: str, vote_cfg):
        self.members = members
        self.label_space = label_space
        self.classes = L.label_space(label_space)
        self.cfg = vote_cfg
        self.rule = VOTE_RULES[vote_cfg.rule]
        self.sees = np.stack([L.mapping_matrix(m.label_space, label_space).sum(0) > 0 for m in members]).astype(float) if members else None
        self.weights = np.array([m.weight for m in members], dtype=float)

    def __call__(self, samples, preassigned: list[str]):
        """-> list of (Vote, {member name: probs in the recipe space})."""
        pre_idx = [self.classes.index(L.canonical(p)) for p in preassigned]
        if not self.members:  # nobody to vote: the preassigned label stands
            return [(Vote(i, np.eye(len(self.classes))[i], 1.0, True), {}) for i in pre_idx]
        mapped = []
        for m in self.members:
            who = m.stage if m.stage is not None else f"expert {m.name!r}"
            mine = private_samples(samples)  # a member that edits its images in place changes only its own copies
            with calling(who, "predict"):
                raw = m.predict(mine)
            check_untouched(who, samples, mine)
            p = expert_probs(who, raw, len(samples), m.label_space, m.outputs)
            mapped.append(L.convert_probs(p, m.label_space, self.label_space))
        mapped = np.stack(mapped, 1)  # (N, M, C)
        out = []
        for n, pre in enumerate(pre_idx):
            v = self.rule(pre, mapped[n], self.sees, self.weights, self.cfg)
            out.append((v, {m.name: mapped[n, j] for j, m in enumerate(self.members)}))
        return out
