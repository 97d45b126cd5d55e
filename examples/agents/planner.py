#!/usr/bin/env python3
"""A planner agent (docs/agents.md, "Planner agents"): a command agent with
planner = true. Given an objective with a planner, taskwarden runs it as the objective's
first step, "plan", with the payload {"title": ..., "input": ...}; its result is the rest
of the objective, a list of steps as in POST /v1/objectives.

Input: {"documents": ["text", ...]}. The plan: one "summarise" step per document, then a
"publish" step (the HTTP agent) that depends on all of them."""

import json
import sys


def main():
    task = json.load(sys.stdin)
    documents = (task.get("input") or {}).get("documents")
    if not isinstance(documents, list) or not documents:
        sys.stderr.write("planner: input.documents must be a non-empty list\n")
        return 2
    print(json.dumps({"progress": "planning", "documents": len(documents)}), flush=True)
    steps = [{"key": f"summarise-{i}", "agent": "summarise", "payload": {"text": doc}}
             for i, doc in enumerate(documents)]
    steps.append({"key": "publish", "agent": "publish",
                  "payload": {"text": task.get("title", "report")},
                  "depends_on": [s["key"] for s in steps]})
    print(json.dumps({"result": steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
