"""A SCRAM client (scramp, from PyPI) for the SASL tests: one AUTHENTICATE over IMAP.

usage: scram_client.py HOST PORT MECHANISM USER PASSWORD ir|noir n|y

Prints every line the server sends as `S: ...`, `VERIFIED` when the server-final signature
checks, and `RESULT <tagged answer>`; after an OK, LIST "" * shows which backend it is on.
`y` sends the GS2 flag y ("I could bind, but you do not offer it") instead of n.
"""

import base64
import socket
import sys

import scramp
from scramp import core

host, port, mech, user, password, ir, flag = sys.argv[1:8]
sock = socket.create_connection((host, int(port)), timeout=20)
reader = sock.makefile("rb")


def line():
    raw = reader.readline()
    if not raw:
        sys.exit("the server closed the connection")
    text = raw.decode().rstrip("\r\n")
    print("S:", text, flush=True)
    return text


def send(text):
    sock.sendall(text.encode() + b"\r\n")


def b64(text):
    return base64.b64encode(text.encode()).decode()


line()
client = scramp.ScramClient([mech], user, password)
if flag == "y":
    client.gs2_header = core.Gs2Header("y", None)
first = b64(client.get_client_first())
if ir == "ir":
    send(f"a AUTHENTICATE {mech} {first}")
else:
    send(f"a AUTHENTICATE {mech}")
    assert line().startswith("+")
    send(first)
answer = line()
if answer.startswith("+ "):
    client.set_server_first(base64.b64decode(answer[2:]).decode())
    final = client.get_client_final()
    # For the secrets test: the proof and the line that carries it must appear nowhere else.
    print("PROOF", final.rsplit("p=", 1)[1], flush=True)
    print("CLIENT-FINAL", b64(final), flush=True)
    send(b64(final))
    answer = line()
    if answer.startswith("+ "):
        try:
            client.set_server_final(base64.b64decode(answer[2:]).decode())
            print("VERIFIED", flush=True)
        except Exception as e:  # noqa: BLE001 - reported, the test decides
            print("SERVER-FINAL-ERROR", e, flush=True)
        send("")
        answer = line()
while not answer.startswith("a "):
    answer = line()
print("RESULT", answer, flush=True)
if answer.startswith("a OK"):
    send('b LIST "" *')
    while not line().startswith("b "):
        pass
send("c LOGOUT")
