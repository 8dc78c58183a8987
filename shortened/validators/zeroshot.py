"""Zero-shot accuracy through EleutherAI's lm-eval harness (its Python API), on an already loaded model.

The defaults are the paper's seven commonsense tasks with the metric it reports for each (accuracy, or
length-normalized accuracy where LLaMA's evaluation uses it) and their average. Any other lm-eval task works
too, including local tasks in lm-eval's YAML format (`include_path`); name a metric with `task:metric`.
"""

from __future__ import annotations

import logging

from shortened.errors import UsageError

log = logging.getLogger(__name__)

# task -> metric the paper reports (the LLM-Pruner / Shortened LLaMA protocol)
PAPER_TASKS = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}


def parse_tasks(tasks: str | list[str] | None) -> dict[str, str | None]:
    """'paper' / None -> the paper's tasks; otherwise names, each optionally 'task:metric'."""
    if tasks is None or tasks == "paper" or tasks == ["paper"]:
        return dict(PAPER_TASKS)
    if isinstance(tasks, str):
        tasks = [t for t in tasks.replace(" ", "").split(",") if t]
    out: dict[str, str | None] = {}
    for t in tasks:
        if t == "paper":
            out.update(PAPER_TASKS)
            continue
        name, _, metric = t.partition(":")
        out[name] = metric or PAPER_TASKS.get(name)
    if not out:
        raise UsageError("--tasks is empty; name lm-eval tasks (e.g. piqa,boolq) or say paper")
    return out


def zeroshot(
    model,
    tokenizer,
    tasks: str | list[str] | None = None,
    limit: int | float | None = None,
    include_path: str | list[str] | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    add_bos: bool | None = None,
) -> dict:
    """Evaluate with lm-eval; returns {"tasks": {task: {"metric", "value", "stderr", "samples", "all"}},
    "average": mean of the reported metrics}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UsageError("zero-shot evaluation needs lm-eval: pip install 'lm-eval==0.4.13'") from e
    wanted = parse_tasks(tasks)
    manager = None
    if include_path:  # local tasks only: skip indexing lm-eval's thousands of built-in task files
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if any(t not in manager.all_tasks for t in wanted):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in wanted if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"lm-eval does not know the tasks {', '.join(unknown)}; check the names or --include-path")
    dev = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(dev), add_bos_token=add_bos)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(wanted),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
    )
    if res is None:  # only non-zero ranks of a distributed run get None
        return {}
    out = {}
    for task, metric in wanted.items():
        r = res["results"].get(task)
        if r is None:
            raise UsageError(f"lm-eval returned no result for {task} (a group? name its sub-tasks)")
        values = {k.split(",")[0]: v for k, v in r.items() if "," in k and "_stderr" not in k}
        metric = metric or ("acc" if "acc" in values else next(iter(values)))
        if metric not in values:
            raise UsageError(f"task {task} has no metric {metric}; it has {', '.join(values)}")
        out[task] = {
            "metric": metric,
            "value": float(values[metric]),
            "stderr": r.get(f"{metric}_stderr,none"),
            "samples": res.get("n-samples", {}).get(task, {}).get("effective"),
            "all": values,
        }
    avg = sum(v["value"] for v in out.values()) / len(out)
    return {"tasks": out, "average": avg, "num_fewshot": num_fewshot, "limit": limit}
