#!/usr/bin/env python3
"""A command agent (docs/agents.md, "Command agents"): taskwarden starts it once per
attempt, writes the task's payload to its stdin as one JSON document, and reads what it
prints on stdout, one JSON object a line.

Payload: {"text": "...", "max_words": 8}. It prints a progress event per stage, the LLM
usage it would have paid for, and {"result": {...}}. A payload without text is the error
path: a message on stderr and a non-zero exit, which fails the attempt with that message
(retried while attempts are left)."""

import json
import os
import sys


def emit(obj):
    # One object a line, flushed: events show in `taskwarden tasks follow` as they come.
    print(json.dumps(obj), flush=True)


def main():
    task = json.load(sys.stdin)
    text = task.get("text") if isinstance(task, dict) else None
    if not isinstance(text, str) or not text.strip():
        sys.stderr.write("summarise: the payload has no \"text\" to summarise\n")
        return 2
    emit({"progress": "reading", "attempt": int(os.environ.get("TASKWARDEN_ATTEMPT", "0"))})
    words = text.split()
    limit = int(task.get("max_words", 8))
    emit({"progress": "summarising", "words": len(words)})
    # What a model call would report; taskwarden adds it to the task's usage and to
    # taskwarden_llm_tokens_total / taskwarden_llm_cost_usd_total.
    emit({"usage": {"prompt_tokens": len(words), "completion_tokens": min(limit, len(words)),
                    "cost_usd": 0.0001 * len(words)}})
    summary = " ".join(words[:limit]) + (" ..." if len(words) > limit else "")
    emit({"result": {"summary": summary, "words": len(words),
                     "task_id": int(os.environ["TASKWARDEN_TASK_ID"])}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
