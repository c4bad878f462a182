"""A minimal external agent harness, standard library only, run INSIDE a sandbox.

It talks to an OpenAI-compatible chat endpoint over a Unix socket (the sandbox has no network),
runs each ```bash block the model writes, feeds the output back, and stops when the model writes
`finish` (or no command), or after MAX_CALLS calls. It stands in for any harness that speaks the
chat API (iFlow CLI, mini-SWE-agent, ...): rollmill only sees its calls through the model proxy.

Environment: ROLLMILL_MODEL_SOCKET, ROLLMILL_SESSION, ROLLMILL_MAX_CALLS, ROLLMILL_MAX_TOKENS,
ROLLMILL_TEMPERATURE. The task instruction is read from the file given as the first argument.
"""

import http.client
import json
import os
import re
import socket
import subprocess
import sys

SYSTEM = ("You are a shell agent in /workspace. Reply with one ```bash code block holding the command "
          "to run next, or with the word finish when the task is done.")
FENCE = re.compile(r"```(?:bash|sh)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def chat(messages, seed):
    conn = UnixHTTPConnection(os.environ.get("ROLLMILL_MODEL_SOCKET", "/run/rollmill/model.sock"))
    body = {"model": "policy", "messages": messages, "seed": seed,
            "max_tokens": int(os.environ.get("ROLLMILL_MAX_TOKENS", "64")),
            "temperature": float(os.environ.get("ROLLMILL_TEMPERATURE", "1.0"))}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "X-Rollmill-Session": os.environ.get("ROLLMILL_SESSION", "default")})
    response = conn.getresponse()
    data = json.loads(response.read())
    if response.status != 200:
        raise SystemExit(f"model call failed ({response.status}): {data}")
    return data["choices"][0]["message"]["content"]


def main():
    with open(sys.argv[1]) as f:
        instruction = f.read()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": instruction}]
    for call in range(int(os.environ.get("ROLLMILL_MAX_CALLS", "4"))):
        reply = chat(messages, seed=call)
        messages.append({"role": "assistant", "content": reply})
        block = FENCE.search(reply)
        if block is None or reply.strip().lower().startswith("finish"):
            break
        done = subprocess.run(["bash", "-c", block.group(1)], capture_output=True, text=True, timeout=30,
                              cwd="/workspace")
        output = (done.stdout + done.stderr)[-1500:]
        messages.append({"role": "user", "content": f"{output}\n[exit code {done.returncode}]"})
    print(json.dumps({"calls": call + 1}))


if __name__ == "__main__":
    main()
