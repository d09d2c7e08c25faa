"""``notes`` inside a QEMU guest — busybox ``httpd`` with CGI scripts, one of them flawed.

DO NOT DEPLOY. The guest's ``/init`` runs :data:`WORKLOAD` (passed on the kernel command
line, see :mod:`bam.sensors.vm.launch`): it writes a tiny web root, a few notes and three CGI
scripts, then runs ``httpd`` in the foreground as ``www-data`` on port 80, which QEMU's user
network forwards to a loopback port of the host.

* ``/`` and ``/notes/NAME`` are static files (``httpd`` forks a child per connection);
* ``/cgi-bin/notes`` lists the notes (a ``sh`` script, shell builtins only);
* ``/cgi-bin/size?name=NAME`` URL-decodes the query with shell builtins and runs
  ``wc -c NAME`` through ``sh -c`` with it pasted in — the command-injection flaw (CWE-78):
  ``name=a.txt;anything`` runs *anything* as ``www-data``. Benign use already runs a shell
  and ``wc``, so the baseline knows that; what it has never seen is what an attacker's shell
  does.

The CGI scripts fork nothing themselves (builtins, then ``exec``): busybox ``ash`` catches
``SIGCHLD``, so every fork + wait in a script lands the signal's ``rt_sigreturn`` at a
point that depends on timing, and a TCG guest's timing swings with the host's load (measured:
benign windows up to 2.2x threshold while the agent fitted its baseline, with
``$(command)`` substitutions in the scripts; the host demo's ``dash`` does not catch it).
"""

from __future__ import annotations

from typing import Final

NOTES: Final = ("buy milk", "call the bank", "quarterly report draft", "passwords are in vault")

WORKLOAD: Final = r"""W=/srv/www;N=$W/notes;C=$W/cgi-bin
mkdir -p $N $C /etc
echo 'root:x:0:0:root:/root:/bin/sh
www-data:x:33:33:www-data:/srv/www:/bin/sh' >/etc/passwd
echo 'root:x:0:
www-data:x:33:' >/etc/group
hostname notes-vm
echo '<h1>notes</h1><a href=/cgi-bin/notes>notes</a>' >$W/index.html
i=0;for t in @NOTES@;do echo "$t" >$N/note$i.txt;i=$((i+1));done
cat >$C/notes <<'E'
#!/bin/sh
echo Content-Type: application/json;echo
cd /srv/www/notes;s=;for f in *.txt;do s="$s\"$f\",";done;echo "[${s%,}]"
E
cat >$C/size <<'E'
#!/bin/sh
echo Content-Type: text/plain;echo
cd /srv/www/notes;q=${QUERY_STRING#name=};q=${q//+/ };eval "n=\$'${q//%/\\x}'"
exec sh -c "wc -c $n"
E
chmod 755 $C/*
echo bam-guest: notes up
exec httpd -f -p 80 -h $W -u www-data:www-data
"""
"""The guest's workload script (``/init`` runs it with busybox ``sh``)."""


def workload() -> str:
    """The workload with the notes filled in (fits the kernel command line)."""
    words = " ".join(f"'{t}'" for t in NOTES)
    return WORKLOAD.replace("@NOTES@", words)


def note_names() -> list[str]:
    return [f"note{i}.txt" for i in range(len(NOTES))]


def guest_path(r: float, note: str) -> str:
    """A user's request for a uniform draw ``r`` (same mix as the host demo)."""
    if r < 0.15:
        return "/"
    if r < 0.4:
        return "/cgi-bin/notes"
    if r < 0.75:
        return f"/notes/{note}"
    return f"/cgi-bin/size?name={note}"
