"""``bam report`` (create / verify evidence tokens), ``bam key`` and ``bam bench evidence``."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bam.cli import app as root
from bam.cli._common import console, err_console, print_json, user_errors
from bam.cli.bench import app as bench_app
from bam.evidence.errors import EvidenceError, VerificationError

# The evidence library (pydantic models, cryptography, PyNaCl) is imported inside the commands,
# so that `bam --help` and other command groups do not pay for it.
if TYPE_CHECKING:
    from bam.evidence.keys import Signer, VerificationKey

app = typer.Typer(
    help="Evidence reports: build signed EAT tokens and verify them.", no_args_is_help=True
)
key_app = typer.Typer(help="The agent's signing keys (public parts, for enrolment).")
root.add_typer(app, name="report")
root.add_typer(key_app, name="key")

EXIT_NOT_VERIFIED = 1


def _read_token(path: Path, what: str = "token") -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvidenceError("token_unreadable", f"{what} {path}: {e.strerror or e}") from None
    if len(data) > (1 << 20):
        raise EvidenceError("token_unreadable", f"{what} {path} is larger than 1 MiB")
    return data.decode("ascii", "replace").strip()


def _trusted_key(key: Path | None) -> VerificationKey:
    from bam.evidence.keys import SoftwareKeyStore, VerificationKey

    if key is not None:
        return VerificationKey.load(key)
    store = SoftwareKeyStore()
    if not store.exists():
        raise EvidenceError(
            "key_missing", f"no --key given and no local key at {store.path}; pass --key PUB"
        )
    return VerificationKey.from_signer(store.load())


def _parse_pcrs(text: str) -> list[int]:
    out: set[int] = set()
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.update(range(int(lo), int(hi) + 1))
            elif part.strip():
                out.add(int(part))
    except ValueError:
        raise EvidenceError("pcrs_invalid", f"--pcrs {text!r}: expected e.g. 0-7,16") from None
    if not out or any(not 0 <= i <= 23 for i in out):
        raise EvidenceError("pcrs_invalid", f"--pcrs {text!r}: PCR indices are 0..23")
    return sorted(out)


def _expected_pcrs(items: list[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for item in items:
        index, sep, value = item.partition("=")
        try:
            i = int(index)
            bytes.fromhex(value)
        except ValueError:
            i = -1
        if not sep or not 0 <= i <= 23 or not value:
            raise EvidenceError("pcrs_invalid", f"--pcr {item!r}: expected INDEX=HEX")
        out[i] = value.lower()
    return out


@app.command("verify")
def verify_cmd(
    token_file: Annotated[Path, typer.Argument(help="File holding one compact token.")],
    key: Annotated[
        Path | None,
        typer.Option(
            "--key", help="Trusted public key (PEM or JWK). Default: the local software key."
        ),
    ] = None,
    nonce: Annotated[
        str | None,
        typer.Option("--nonce", help="The nonce you issued; also enables the freshness check."),
    ] = None,
    max_age: Annotated[
        float, typer.Option("--max-age", help="Freshness window for --nonce, s.")
    ] = 300.0,
    prev: Annotated[
        Path | None,
        typer.Option(
            "--prev", help="The previous token of this agent: checks seq, chain, TPM counters."
        ),
    ] = None,
    ak: Annotated[
        list[Path] | None,
        typer.Option("--ak", help="Enrolled TPM attestation key (PEM or JWK); repeatable."),
    ] = None,
    require_tpm: Annotated[
        bool, typer.Option("--require-tpm", help="Fail without a TPM quote.")
    ] = False,
    pcr: Annotated[
        list[str] | None, typer.Option("--pcr", help="Reference PCR value INDEX=HEX; repeatable.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Verify an evidence token: print its claims and OK, or the reason and exit 1."""
    from bam.evidence.keys import VerificationKey
    from bam.evidence.verify import verify_token

    with user_errors():
        text = _read_token(token_file)
        trusted = _trusted_key(key)
        aks = [VerificationKey.load(p).kid for p in ak or []] or None
        expected = _expected_pcrs(pcr or []) or None
        try:
            previous = None
            if prev is not None:
                try:
                    previous = verify_token(_read_token(prev, "--prev token"), trusted)
                except VerificationError as e:
                    raise VerificationError(
                        "previous_invalid", f"--prev {prev}: {e.reason}: {e.message}"
                    ) from None
            result = verify_token(
                text,
                trusted,
                nonce=nonce,
                max_age_s=max_age,
                previous=previous,
                require_tpm=require_tpm,
                trusted_aks=aks,
                expected_pcrs=expected,
            )
        except VerificationError as e:
            if as_json:
                print_json({"ok": False, "reason": e.reason, "message": e.message})
            else:
                err_console.print(
                    f"[bold red]FAILED[/] {e.reason}: {e.message}", highlight=False, soft_wrap=True
                )
            raise typer.Exit(EXIT_NOT_VERIFIED) from None
    if as_json:
        print_json(result.summary())
        return
    console.print_json(json.dumps(result.payload))
    for name, state in result.checks.items():
        console.print(f"  {name:<15} {state}", highlight=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"  [yellow]note[/] {note}", highlight=False, soft_wrap=True)
    console.print(
        f"[bold green]OK[/] seq {result.claims.bam_seq} kid {result.kid} digest {result.digest}",
        highlight=False,
        soft_wrap=True,
    )


def _signer(tpm_device: Any, use_tpm_key: bool) -> Signer:
    from bam.evidence.keys import SoftwareKeyStore

    if use_tpm_key:
        from bam.evidence.keys.tpm import TpmSigner

        return TpmSigner(tpm_device)
    return SoftwareKeyStore().load_or_create()


@app.command("create")
def create_cmd(
    nonce: Annotated[
        str | None,
        typer.Option("--nonce", help="Verifier-issued nonce (default: a random one, for testing)."),
    ] = None,
    pid: Annotated[
        int | None, typer.Option("--pid", help="Measure this process as the target.")
    ] = None,
    vm: Annotated[str | None, typer.Option("--vm", help="Target is a VM of this name.")] = None,
    disk: Annotated[
        list[Path] | None, typer.Option("--disk", help="VM disk image; repeatable.")
    ] = None,
    kernel: Annotated[Path | None, typer.Option("--kernel", help="VM kernel.")] = None,
    initrd: Annotated[Path | None, typer.Option("--initrd", help="VM initrd.")] = None,
    firmware: Annotated[
        list[Path] | None, typer.Option("--firmware", help="VM firmware file; repeatable.")
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model", help="MODEL_ID=PATH[,PATH...] of a baseline/classifier; repeatable."
        ),
    ] = None,
    behavior: Annotated[
        Path | None,
        typer.Option("--behavior", help="JSON file with the behaviour summary of the window."),
    ] = None,
    tcti: Annotated[
        str | None,
        typer.Option(
            "--tcti", help="Add a TPM quote via this TCTI (e.g. swtpm:host=127.0.0.1,port=2321)."
        ),
    ] = None,
    pcrs: Annotated[str, typer.Option("--pcrs", help="PCRs to quote (sha256 bank).")] = "0-7",
    tpm_key: Annotated[
        bool, typer.Option("--tpm-key", help="Sign with the TPM key (ES256).")
    ] = False,
    chain: Annotated[
        Path | None,
        typer.Option(
            "--chain", help="Chain state file (default: evidence-chain.json in the data dir)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the token here.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print token and claims as JSON.")
    ] = False,
) -> None:
    """Measure, sign and print (or write) the next evidence token of this agent."""
    from bam.evidence.claims import BehaviorSummary, Target
    from bam.evidence.keys import default_data_dir
    from bam.evidence.measure import (
        collect_measurements,
        measure_model,
        measure_process,
        measure_vm,
    )
    from bam.evidence.nonces import new_nonce
    from bam.evidence.token import EvidenceBuilder, FileChain

    with user_errors():
        if tpm_key and tcti is None:
            raise EvidenceError("tpm_unavailable", "--tpm-key needs --tcti")
        process = measure_process(pid) if pid is not None else None
        files = measure_vm(disks=disk or [], kernel=kernel, initrd=initrd, firmware=firmware or [])
        if process is not None:
            target = Target(kind="process", name=process.name, pid=process.pid)
        elif vm is not None:
            target = Target(kind="vm", name=vm)
        else:
            target = Target(kind="host", name=socket.gethostname() or "localhost")
        models = []
        for item in model or []:
            model_id, sep, paths = item.partition("=")
            if not sep or not model_id or not paths:
                raise EvidenceError("model_invalid", f"--model {item!r}: expected ID=PATH[,PATH]")
            models.append(measure_model(model_id, paths.split(",")))
        summary = None
        if behavior is not None:
            try:
                summary = BehaviorSummary.model_validate_json(behavior.read_bytes())
            except (OSError, ValueError) as e:
                raise EvidenceError("behavior_invalid", f"{behavior}: {e}") from None
        measurements = collect_measurements(target, process=process, files=files, models=models)
        chain_store = FileChain(chain or default_data_dir() / "evidence-chain.json")
        device = None
        if tcti is not None:
            from bam.evidence.tpm import TpmDevice

            device = TpmDevice(tcti).open()
        try:
            builder = EvidenceBuilder(
                _signer(device, tpm_key),
                chain=chain_store,
                tpm=device,
                pcrs=_parse_pcrs(pcrs),
            )
            ev = builder.build(nonce or new_nonce(), measurements, summary)
        finally:
            if device is not None:
                device.close()
        if out is not None:
            out.write_text(ev.token + "\n")
    if as_json:
        print_json({"token": ev.token, "digest": ev.digest, "claims": ev.claims})
    elif out is None:
        typer.echo(ev.token)
    else:
        console.print(
            f"wrote {out}: seq {ev.claims['bam_seq']} nonce {ev.claims['eat_nonce']}",
            highlight=False,
            soft_wrap=True,
        )


@app.command("quote-files")
def quote_files_cmd(
    token_file: Annotated[Path, typer.Argument(help="A token with a TPM quote.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory for ak.pem, attest.bin, ...")],
) -> None:
    """Export a token's TPM quote for tpm2_checkquote (claims NOT verified by this command)."""
    from bam.evidence.quote import export_checkquote_files

    with user_errors():
        text = _read_token(token_file)
        files = export_checkquote_files(text, out_dir)
    for name, path in files.items():
        console.print(f"{name:<10} {path}", highlight=False, soft_wrap=True)
    console.print(
        f"tpm2_checkquote -u {files['ak']} -m {files['attest']} -s {files['signature']} "
        f"-f {files['pcrs']} -g sha256 -q $(cat {files['qualifying']})",
        highlight=False,
        soft_wrap=True,
    )


@key_app.command("show")
def key_show_cmd(
    pem: Annotated[bool, typer.Option("--pem", help="Print only the public key as PEM.")] = False,
    tcti: Annotated[
        str | None,
        typer.Option("--tcti", help="Show the TPM signing key and attestation key instead."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the public key and thumbprint to enrol (creates the software key on first use)."""
    from bam.evidence.keys import SoftwareKeyStore, VerificationKey

    with user_errors():
        info: dict[str, Any]
        if tcti is not None:
            from bam.evidence.tpm import TpmDevice

            with TpmDevice(tcti) as dev:
                sk = VerificationKey.from_jwk(dev.signing_jwk())
                akey = VerificationKey.from_jwk(dev.ak_jwk())
            info = {
                "alg": sk.alg,
                "kid": sk.kid,
                "jwk": sk.jwk,
                "pem": sk.pem(),
                "source": f"tpm ({tcti})",
                "ak": {"kid": akey.kid, "jwk": akey.jwk, "pem": akey.pem()},
            }
        else:
            store = SoftwareKeyStore()
            vk = VerificationKey.from_signer(store.load_or_create())
            info = {
                "alg": vk.alg,
                "kid": vk.kid,
                "jwk": vk.jwk,
                "pem": vk.pem(),
                "source": str(store.path),
            }
    if pem:
        typer.echo(info["pem"], nl=False)
    elif as_json:
        print_json(info)
    else:
        console.print(f"alg     {info['alg']}\nkid     {info['kid']}\nsource  {info['source']}")
        console.print(info["pem"], highlight=False, end="")
        if "ak" in info:
            console.print(f"AK kid  {info['ak']['kid']}")
            console.print(info["ak"]["pem"], highlight=False, end="")


@bench_app.command("evidence")
def bench_evidence_cmd(
    n: Annotated[int, typer.Option("--n", min=10, help="Tokens to build and verify.")] = 1000,
    quotes: Annotated[
        int, typer.Option("--quotes", min=0, help="TPM quotes to time (0: none).")
    ] = 50,
    tcti: Annotated[
        str | None, typer.Option("--tcti", help="TPM to use (default: start a swtpm).")
    ] = None,
    tpm: Annotated[bool, typer.Option("--tpm/--no-tpm", help="Also time TPM quotes.")] = True,
    files: Annotated[
        int, typer.Option("--files", min=1, help="File measurements per token (size of token).")
    ] = 24,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Tokens signed and verified per second (software key) and TPM quotes per second."""
    from bam.evidence.bench import bench_evidence

    with user_errors():
        result = bench_evidence(n=n, quotes=quotes, tcti=tcti, tpm=tpm, files=files)
    if as_json:
        print_json(result)
        return
    for k, v in result.items():
        console.print(f"{k:<20} {v}", highlight=False, soft_wrap=True)
