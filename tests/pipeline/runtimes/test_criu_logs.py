"""The cause a failed CRIU run reports: its first real error, not the summary lines it ends with."""

from skyferry.pipeline.criu import logs

# CRIU 4.2's log format: a traced task's dump (as logged on this machine), and a restore error with the
# task prefix CRIU adds while restoring.
SEIZE = """\
(06.465297) Warn  (compel/src/lib/infect.c:132): Unable to interrupt task: 23093 (Operation not permitted)
(06.465336) Error (criu/seize.c:335): zombie 23093 (comm python3) found while seizing
(06.565993) Error (criu/seize.c:335): zombie 23093 (comm python3) found while seizing
(10.070000) Error (criu/cr-dump.c:2093): Dumping FAILED.
"""
RESTORE = """\
(00.061112)      1: Error (criu/net.c:3062): Can't open net ns /run/netns/x-local-2-c: No such file or directory
(00.061200)      1: Error (criu/cr-restore.c:1640): 23 exited, status=1
(00.081000) Error (criu/cr-restore.c:2570): Restoring FAILED.
"""


def test_the_first_error_that_names_a_cause() -> None:
    assert logs.first_error(SEIZE) == "zombie 23093 (comm python3) found while seizing"
    assert logs.first_error(RESTORE) == ("Can't open net ns /run/netns/x-local-2-c: No such file or directory (task 1)")


def test_a_log_of_summaries_only_names_nothing() -> None:
    assert logs.first_error("(01.0) Error (criu/cr-dump.c:2093): Dumping FAILED.\n") is None
    assert logs.first_error("") is None


def test_tail_keeps_the_last_lines() -> None:
    text = "\n".join(str(i) for i in range(200))
    assert logs.tail(text, 3) == "197\n198\n199"
