"""Batch prediction on Ray Data: questions as a Ray Dataset, an actor pool of llavakit engines (one
`llavakit.LLM` per replica, on its own GPUs), answers appended by the driver to the model_vqa JSONL file that the
one-process `llavakit predict` writes, in the order they complete.

Replicas read their questions' images themselves (paths on storage every node sees, or URLs through the guarded
fetcher): only question rows go to a replica and only answer lines come back. Ray restarts a replica that dies
and runs its unfinished batches again; the driver writes a question's answer only if the file lacks it, so a
retried batch or a rerun never writes one twice, and a rerun answers only what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from llavakit.sampling import SamplingParams
from llavakit.scale.questions import (
    answer_line,
    answer_record,
    answered_ids,
    image_sources,
    problem_line,
    question_problem,
    question_seed,
    question_text,
)

if TYPE_CHECKING:
    import pyarrow
    import ray.data

INSTALL_HINT = "Ray Data is not installed; install it with: pip install 'ray[data]'"


@dataclass(slots=True)
class PredictSettings:
    """What each replica needs to answer a question as the one-process `llavakit predict` does.

    `llm_kwargs`: `llavakit.LLM`'s keywords (dtype, device, quantization, image_aspect_ratio, conv_mode as the
    checkpoint's template, engine settings); `conv_mode` here is the per-question one ("raw": verbatim).
    `threads`: torch's CPU threads in each replica, also the CPUs Ray reserves for it.
    """

    model: str = "demo"
    llm_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=128))
    image_folder: str = "."
    prompt_suffix: str | None = None
    conv_mode: str | None = None
    model_id: str | None = None
    tensor_parallel_size: int = 1
    threads: int = 1

    def __post_init__(self):
        if self.tensor_parallel_size < 1 or self.threads < 1:
            raise ValueError(f"tensor_parallel_size and threads must be at least 1, got {self.tensor_parallel_size} "
                             f"and {self.threads}")
        if self.model_id is None:
            self.model_id = Path(str(self.model).rstrip("/")).name
        # Replicas do not run in the driver's folder: relative paths would name other files there.
        self.image_folder = os.path.abspath(self.image_folder)
        if Path(self.model).exists():
            self.model = os.path.abspath(self.model)

    def llm_settings(self) -> dict[str, Any]:
        """`llavakit.LLM`'s keywords for one replica."""
        return {**self.llm_kwargs, "tensor_parallel_size": self.tensor_parallel_size}

    def params_for(self, question_id: Any) -> SamplingParams:
        """The sampling of one question: a sampled run without a seed gets the question's own seed."""
        if self.sampling.seed is None and self.sampling.temperature > 0:
            return dataclasses.replace(self.sampling, seed=question_seed(question_id))
        return self.sampling


@dataclass(slots=True)
class PredictCounts:
    """What a run did: answers written, questions skipped (bad row or image), answers already in the file."""

    answered: int = 0
    skipped: int = 0
    already_done: int = 0


class Answerer:
    """One replica: an engine that answers a batch of question rows with one answer line or one skip message
    per question; questions in `done` are left out. A question whose row, image or prompt is bad is skipped,
    never the batch."""

    def __init__(self, settings: PredictSettings, done: frozenset = frozenset()):
        import torch

        from llavakit.llm import LLM

        torch.set_num_threads(settings.threads)
        self.settings, self.done = settings, done
        self.llm = LLM(settings.model, **settings.llm_settings())

    def __call__(self, batch: pyarrow.Table) -> dict[str, list[str]]:
        engine, answers, problems, asked = self.llm.engine, [], [], {}
        for item in batch.to_pylist():
            text = item.get("question")
            if text is not None and not text.strip():
                continue  # a blank line of a question file
            row = item
            try:
                row = item if text is None else json.loads(text)
                if isinstance(row, dict) and row.get("question_id") in self.done:
                    continue
                self._add(row, asked)
            except (ValueError, OSError) as e:
                problems.append(f"question {_name(row, text)}: {problem_line(e)}")
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    completion = out.outputs[0]
                    record = answer_record(asked.pop(out.request_id), self.settings.model_id, completion.text,
                                           completion.finish_reason, len(out.prompt_token_ids),
                                           len(completion.token_ids))
                    answers.append(answer_line(record))
        return {"answer": answers + [""] * len(problems), "problem": [""] * len(answers) + problems}

    def _add(self, row: dict, asked: dict[str, dict]) -> None:
        """Build the question's prompt (its image read here) and hand it to the engine."""
        problem = question_problem(row)
        if problem:
            raise ValueError(problem)
        s = self.settings
        inputs = self.llm.processor.prompt_inputs(question_text(row["text"], s.prompt_suffix),
                                                  image_sources(row, s.image_folder), conv_mode=s.conv_mode)
        request_id = self.llm.engine.new_request_id("predict")
        self.llm.engine.add_request(request_id, inputs, s.params_for(row["question_id"]))
        asked[request_id] = row


def _name(row: Any, text: str | None) -> str:
    """How a skipped question is named: its id, else the start of its line."""
    if isinstance(row, dict) and row.get("question_id") is not None:
        return str(row["question_id"])
    return repr(text[:40]) if text else "without an id"


def predict_dataset(questions: ray.data.Dataset, answers: str | Path, settings: PredictSettings | None = None, *,
                    num_replicas: int = 1, gpus_per_replica: float = 0, batch_size: int = 16,
                    total: int | None = None, progress: bool = True) -> PredictCounts:
    """Answer the questions in `questions` that `answers` (model_vqa JSONL) lacks, on `num_replicas` replicas
    with `gpus_per_replica` GPUs each, `batch_size` questions at a time; answers are appended as they complete.
    `total`: the number of questions, for the progress bar. Skipped questions are reported on stderr.

    A row is a question's fields as columns ({"question_id", "text", optional "image"}: `ray.data.read_json`),
    or one column "question" with its JSON text (`ray.data.read_text(file).rename_columns({"text": "question"})`),
    which holds question ids of mixed types and fields that differ between rows, as Arrow columns cannot."""
    from ray.data import ActorPoolStrategy

    settings = settings or PredictSettings()
    answers = Path(answers)
    done = answered_ids(answers)
    replicas = questions.map_batches(
        Answerer, fn_constructor_kwargs={"settings": settings, "done": frozenset(done)}, batch_format="pyarrow",
        batch_size=batch_size, compute=ActorPoolStrategy(size=num_replicas), num_gpus=gpus_per_replica,
        num_cpus=settings.threads)  # Ray Data's actors restart when they die, and their batches run again
    counts = PredictCounts(already_done=len(done))
    with answers.open("a") as f, tqdm(total=total, desc="predict", unit="q", disable=not progress or None) as bar:
        for row in replicas.iter_rows():
            if row["problem"]:
                counts.skipped += 1
                print(f"skipped {row['problem']}", file=sys.stderr)
            elif (question_id := json.loads(row["answer"])["question_id"]) not in done:
                done.add(question_id)
                f.write(row["answer"])
                f.flush()
                counts.answered += 1
            bar.update(1)
    return counts
