"""Who is running: a tag naming this process, and whether the process a tag names is alive.

Used to tell crashed writers from running ones: a memory file's temporary
files and a Milvus memory's open writes carry the tag of their writer.
"""

import os
import socket


def process_start(pid):
    """When process `pid` started (clock ticks since boot, a string), or None if it is gone.

    With the pid, it names a process uniquely: a pid may be reused, its start
    time not. Where there is no ``/proc``, it is the empty string for a live
    process.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass
    return ""


def process_tag():
    """``host|pid|start`` of this process."""
    return f"{socket.gethostname()}|{os.getpid()}|{process_start(os.getpid())}"


def split_tag(tag):
    """(host, pid or None, start) of a tag written by :func:`process_tag`."""
    host, pid, start = (str(tag).split("|") + ["", "", ""])[:3]
    return host, int(pid) if pid.isdigit() else None, start


def is_dead(tag):
    """Whether the process `tag` names is known to be gone (only known on this host)."""
    host, pid, start = split_tag(tag)
    if host != socket.gethostname() or pid is None:
        return False
    now = process_start(pid)
    return now is None or (start != "" and now != "" and now != start)
