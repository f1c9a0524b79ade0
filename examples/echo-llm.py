#!/usr/bin/env python3
"""A stand-in for an OpenAI-compatible model server (vLLM, llama.cpp server, Ollama), for trying
Lodge's translation gateway without a model: every "translation" is the text it was sent,
unchanged. Python's standard library only.

    python3 examples/echo-llm.py [PORT]      # http://127.0.0.1:PORT/v1, PORT 8000 by default

It answers the two calls the gateway makes (actors/src/translate/backend.rs):
GET /v1/models and a non-streaming POST /v1/chat/completions, whose answer is the last user
message, with word counts as token usage. Anything else gets 404; a streaming request gets 400.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "echo"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the gateway pools its connections

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self.answer(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self.answer(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") != "/v1/chat/completions":
            self.answer(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            request = json.loads(body)
            messages = request["messages"]
        except (ValueError, KeyError, TypeError) as e:
            self.answer(400, {"error": {"message": f"bad request: {e}"}})
            return
        if request.get("stream"):
            self.answer(400, {"error": {"message": "this stand-in does not stream"}})
            return
        users = [m.get("content", "") for m in messages if m.get("role") == "user"]
        text = users[-1] if users else ""
        prompt = sum(len(str(m.get("content", "")).split()) for m in messages)
        completion = len(text.split())
        self.answer(200, {
            "id": "echo-1",
            "object": "chat.completion",
            "model": request.get("model") or MODEL,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        })

    def answer(self, status, doc):
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass  # one line per request would drown the example's output


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"echo-llm ready http://127.0.0.1:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
