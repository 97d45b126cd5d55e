#!/usr/bin/env python3
"""An HTTP agent service (docs/agents.md, "HTTP agents"), Python's standard library only:
python3 examples/agents/http_agent.py [--port 8080]

taskwarden POSTs each attempt's payload as JSON to /run, with the task id, the attempt
(from 1) and the run slot in X-Taskwarden-Task-Id, X-Taskwarden-Attempt and
X-Taskwarden-Session-Id. What the answer means to taskwarden:

- 200 with a JSON body: success; the body is the result, and its top-level "usage" is
  taken out of it and added to the task's token usage.
- 200 with Content-Type text/event-stream (payload "stream": true): each event's data is
  handled like a command agent's stdout line (an event, usage, the result).
- 503 (or 429, or any 5xx): the attempt fails and is retried with backoff. Payload
  "flaky": true answers 503 to the first attempt, to show it.
- 422 (any other 4xx): the task fails for good, no retry. A payload without "text".
"""

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Agent(BaseHTTPRequestHandler):
    def do_POST(self):
        if self.path != "/run":
            return self.reply(404, "text/plain", b"no such endpoint")
        length = int(self.headers.get("Content-Length", "0"))
        try:
            payload = json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            return self.reply(400, "text/plain", b"payload is not JSON")
        task_id = int(self.headers["X-Taskwarden-Task-Id"])
        attempt = int(self.headers["X-Taskwarden-Attempt"])
        if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
            # 4xx: taskwarden fails the task at once with this body in its error.
            return self.reply(422, "text/plain", b"payload has no text")
        if payload.get("flaky") and attempt == 1:
            # 5xx: taskwarden retries; the next request carries X-Taskwarden-Attempt: 2.
            return self.reply(503, "text/plain", b"warming up, try again")
        shouted = payload["text"].upper()
        usage = {"prompt_tokens": len(payload["text"].split()), "completion_tokens": 1,
                 "cost_usd": 0.0002}
        if payload.get("stream"):
            return self.stream(task_id, attempt, shouted, usage)
        body = {"shouted": shouted, "task_id": task_id, "attempt": attempt, "usage": usage}
        self.reply(200, "application/json", json.dumps(body).encode())

    def stream(self, task_id, attempt, shouted, usage):
        # Server-sent events, read by taskwarden as they arrive; no Content-Length, the
        # stream ends when the connection closes.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for data in ({"progress": "shouting"}, {"usage": usage},
                     {"result": {"shouted": shouted, "task_id": task_id, "attempt": attempt}}):
            self.wfile.write(b": keep-alive\n\n")  # a comment, ignored; keeps the read alive
            self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
            self.wfile.flush()

    def reply(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("http_agent: " + fmt % args + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Agent)
    host, port = server.server_address[:2]
    # The line a supervisor (or the test) waits for, with the port actually bound.
    print(f"http_agent listening on http://{host}:{port}/run", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
