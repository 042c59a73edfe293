"""`allmende chat` driven as a person would: in a pseudo-terminal, typing lines,
pressing Ctrl-C mid-answer, and through the real swarm, where a second turn must send
only its new tokens."""

import os
import re
import urllib.request

import pexpect

from conftest import BINARY

PROMPT = ">>> "


def spawn_chat(*args, log=None):
    env = dict(os.environ, ALLMENDE_LOG="warn,allmende_node::cli::chat=debug")
    child = pexpect.spawn(str(BINARY), ["chat", "--threads", "1", *args], env=env,
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.logfile_read = log
    return child


def positions_served(swarm):
    """Positions node A (layers 0..15) computed for remote sessions, from /metrics."""
    with urllib.request.urlopen(swarm.url + "/metrics") as response:
        text = response.read().decode()
    return int(re.search(r"^allmende_positions_total (\d+)", text, re.M).group(1))


def ask(child, text):
    """Types a line and returns what the chat printed before the next prompt, and the
    session's figures from the debug log (new tokens sent, positions held before and
    after)."""
    child.sendline(text)
    child.expect(r"turn sent (\d+) new tokens after (\d+) held; the session holds (\d+)")
    sent, past, holds = (int(g) for g in child.match.groups())
    child.expect_exact(PROMPT)
    return child.before, sent, past, holds


def test_a_second_turn_through_the_swarm_sends_only_its_new_tokens(swarm, output_dir):
    with open(output_dir / "chat-swarm.log", "w") as log:
        child = spawn_chat("--bootstrap", swarm.a.addr, "--no-mdns", "--max-tokens", "24",
                           "--temperature", "0", log=log)
        child.expect_exact(PROMPT)
        before = positions_served(swarm)
        _, sent1, past1, holds1 = ask(child, "What is the capital of France?")
        after1 = positions_served(swarm)
        _, sent2, past2, holds2 = ask(child, "And which river flows through it?")
        after2 = positions_served(swarm)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
    assert child.exitstatus == 0
    assert past1 == 0 and sent1 > 0
    # The first server computed exactly the positions the client says it sent.
    assert after1 - before == holds1
    # Turn two continues the session: only its new tokens (and its answer) are computed.
    assert past2 == holds1, "the second turn must keep the first turn's session"
    assert after2 - after1 == holds2 - past2
    assert sent2 < holds2 - sent2, "the new tokens are fewer than the conversation"


def test_ctrl_c_stops_an_answer_and_the_conversation_goes_on(output_dir):
    with open(output_dir / "chat-local.log", "w") as log:
        child = spawn_chat("--local", "--max-tokens", "400", "--temperature", "0", log=log)
        child.expect_exact(PROMPT)
        child.sendline("Write a very long story about a dragon who learns to cook.")
        # Past the terminal's echo of the line, wait until the answer streams, then
        # interrupt it.
        child.expect_exact("cook.\r\n")
        child.expect(r"\w+ \w+ \w+ \w+")
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect(r"the session holds (\d+)")
        stopped_at = int(child.match.group(1))
        child.expect_exact(PROMPT)
        # The interrupted answer stays in the conversation: the next turn continues it.
        _, sent, past, _ = ask(child, "Give the dragon a name.")
        assert past == stopped_at
        assert sent < 40
        child.sendline("/reset")
        child.expect_exact("(a new conversation)")
        child.expect_exact(PROMPT)
        _, _, past, _ = ask(child, "Hi!")
        assert past == 0
        child.sendline("/nonsense")
        child.expect_exact("unknown command /nonsense")
        # Ctrl-C at the prompt leaves.
        child.expect_exact(PROMPT)
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
    assert child.exitstatus == 130 or child.signalstatus is not None


def test_piped_input_answers_each_line_and_ends_at_eof():
    import subprocess
    out = subprocess.run([str(BINARY), "chat", "--local", "--threads", "1", "--max-tokens", "8",
                          "--temperature", "0"], input="Hello!\n/reset\nHi\n",
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2, out.stdout
    assert PROMPT not in out.stdout
