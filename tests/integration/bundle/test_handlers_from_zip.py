"""The Lambda handlers run from the built zip, as Lambda would run them.

The zip (built for this machine: x86_64 here, and this Python) is unpacked into a
task directory; a fresh virtual environment without edp imports the handlers
from it, with boto3 from a separate runtime directory (the Lambda Python
runtime provides boto3, so the zip leaves it out). Each invocation is its own
process, like a Lambda container. The environment variables are those that
``deploy/edp.yaml`` gives both functions, rendered for the test's parameters.

The flow is the stack's: S3 uploads -> EventBridge rule on the default bus ->
ingest queue; the test receives those messages and hands them to
``store_handler`` as a Lambda SQS event; then ``emit_handler`` runs with a
scheduled event, fires the quiet batch and publishes to the custom bus, whose
rule (the seeds' pattern) feeds a queue the test reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from deploy.test_cfn_templates import EDP_TEMPLATE, lambda_environment, load_template
from edp.config import SETTING_NAMES, env_name
from edp_testing import unique
from integration.bundle.bundle_testing import ACCOUNT, REGION, Aws

INVOKE = Path(__file__).with_name("lambda_invoke.py")
SEEDS_SOURCE = "com.quiltdata.edp"

COUNT_KEYS = ("lab/run-1/a.csv", "lab/run-1/b.csv")  # 2 files: fires on count
QUIET_KEYS = ("lab/run-2/c.csv",)  # 1 file: fires after 2 s of quiet, in emit
# (Event times are whole seconds: with a 1 s quiet period, two uploads either side of a
# second's boundary closed run-1 by its quiet period before its second file counted.)
EXPECTED = {("lab/run-1/", 2, "count"), ("lab/run-2/", 1, "duration")}


def render(value: Any, refs: dict[str, Any], conditions: dict[str, bool]) -> Any:
    """A template value with Ref, Fn::Join and Fn::If resolved (all that Environment and
    the rules' event patterns use); other mappings are rendered key by key."""
    if isinstance(value, list):
        return [render(item, refs, conditions) for item in value]
    if isinstance(value, dict) and not (
        len(value) == 1 and next(iter(value)).startswith(("Ref", "Fn::"))
    ):
        return {key: render(item, refs, conditions) for key, item in value.items()}
    if isinstance(value, dict):
        ((function, argument),) = value.items()
        if function == "Ref":
            found = refs[argument]
            return found if isinstance(found, list) else str(found)
        if function == "Fn::Join":
            separator, items = argument
            return separator.join(render(items, refs, conditions))
        if function == "Fn::If":
            condition, when_true, when_false = argument
            return render(when_true if conditions[condition] else when_false, refs, conditions)
        raise AssertionError(f"the test cannot render {function}: extend render()")
    return str(value)


def stack_environment(parameters: dict[str, Any], resources: dict[str, str]) -> dict[str, str]:
    """The EDP_* variables deploy/edp.yaml gives the store Lambda for these parameters."""
    template = load_template(EDP_TEMPLATE)
    refs: dict[str, Any] = {
        name: spec.get("Default") for name, spec in template["Parameters"].items()
    }
    refs.update(parameters)
    refs.update(resources)
    refs.update({"AWS::Region": REGION, "AWS::AccountId": ACCOUNT})
    conditions = {"CreateEventBus": refs["CreateEventBus"] == "true"}
    variables = lambda_environment(template, "StoreFunction")
    assert variables == lambda_environment(template, "EmitFunction")
    settings = {env_name(name) for name in SETTING_NAMES}
    assert set(variables) <= settings, f"not edp settings: {set(variables) - settings}"
    return {name: render(value, refs, conditions) for name, value in variables.items()}


def sqs_lambda_event(messages: list[dict[str, Any]], queue_arn: str) -> dict[str, Any]:
    """What the Lambda SQS event source mapping hands the function for these messages."""
    records = [
        {
            "messageId": m["MessageId"],
            "receiptHandle": m["ReceiptHandle"],
            "body": m["Body"],
            "attributes": m.get("Attributes", {}),
            "messageAttributes": m.get("MessageAttributes", {}),
            "md5OfBody": hashlib.md5(m["Body"].encode(), usedforsecurity=False).hexdigest(),
            "eventSource": "aws:sqs",
            "eventSourceARN": queue_arn,
            "awsRegion": REGION,
        }
        for m in messages
    ]
    # A poison message: acknowledged and kept as a dead letter, not a batch failure.
    records.append({**records[0], "messageId": str(uuid.uuid4()), "body": "not json",
                    "md5OfBody": hashlib.md5(b"not json", usedforsecurity=False).hexdigest()})
    return {"Records": records}


def scheduled_event() -> dict[str, Any]:
    """An EventBridge Scheduler tick, as EmitSchedule sends it."""
    return {
        "version": "0", "id": str(uuid.uuid4()), "detail-type": "Scheduled Event",
        "source": "aws.events", "account": ACCOUNT,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "region": REGION,
        "resources": [f"arn:aws:events:{REGION}:{ACCOUNT}:rule/edp-EmitSchedule"],
        "detail": {},
    }


def invoke(
    python: Path, handler: str, event: dict[str, Any], *, env: dict[str, str], work: Path
) -> dict[str, Any]:
    """Run one handler in its own process (a fresh Lambda container)."""
    event_file = work / f"event-{uuid.uuid4().hex[:8]}.json"
    event_file.write_text(json.dumps(event), encoding="utf-8")
    done = subprocess.run(
        [str(python), "-P", str(INVOKE), handler, str(event_file)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    outcome: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in outcome, f"{outcome['error']}\n{done.stderr}"
    return outcome


def store_then_emit(
    python: Path, messages: list[dict[str, Any]], queue_arn: str, *, env: dict[str, str],
    wait: float, work: Path,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The store Lambda gets ``messages`` as one SQS batch (plus a poison message);
    ``wait`` seconds later the emit Lambda runs on its schedule: both outcomes."""
    stored = invoke(python, "edp.aws.handlers.store_handler",
                    sqs_lambda_event(messages, queue_arn),
                    env={**env, "AWS_LAMBDA_FUNCTION_NAME": "edp-store"}, work=work)
    time.sleep(wait)
    emitted = invoke(python, "edp.aws.handlers.emit_handler", scheduled_event(),
                     env={**env, "AWS_LAMBDA_FUNCTION_NAME": "edp-emit"}, work=work)
    return stored, emitted


def database(request: pytest.FixtureRequest, kind: str, aws: Aws, tmp_path: Path) -> dict[str, str]:
    """Variables that point the handlers at the test's database, and the secret's ARN."""
    if kind == "sqlite":
        return {"EDP_DATABASE_URL": f"sqlite:///{tmp_path / 'edp.db'}", "secret": ""}
    fields = request.getfixturevalue("pg_database")
    secret = {k: v for k, v in fields.items() if k != "url"}
    arn = aws.secrets.create_secret(Name=unique("edp-db"), SecretString=json.dumps(secret))["ARN"]
    return {"secret": arn}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_handlers_from_the_zip_turn_uploads_into_batch_events(
    database_kind: str, request: pytest.FixtureRequest, aws: Aws,
    aws_environment: dict[str, str], task_dir: Path, runtime_dir: Path, clean_python: Path,
    tmp_path: Path,
) -> None:
    kind = database_kind
    # Given a bucket whose S3 events reach an ingest queue through the default bus,
    bucket = aws.bucket()
    ingest_url, ingest_arn = aws.s3_events_to_queue(bucket)
    # ... an edp bus with the seeds' rule (for that bucket) feeding an output queue,
    bus, out_url = aws.edp_bus_to_queue(bucket, source=SEEDS_SOURCE)
    # ... the Lambdas' environment as deploy/edp.yaml renders it,
    db = database(request, kind, aws, tmp_path)
    secret_arn = db.pop("secret") or f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:unused"
    edp_env = stack_environment(
        {"BucketName": [bucket], "BucketPrefixDepth": "2", "BucketThresholdEventCount": "2",
         "BucketThresholdDuration": "2", "EventBusName": bus},
        {"DBSecret": secret_arn, "EventBus": bus, "IngestQueue": ingest_url},
    )
    base_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
        "PYTHONPATH": f"{task_dir}{os.pathsep}{runtime_dir}", "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        **aws_environment, **edp_env, **db,
        # moto sends EventBridge keys unencoded (AWS encodes them)
        "EDP_EVENTBRIDGE_RAW_KEYS": "true",
        # the store container goes quiet at once, so emit need not wait a minute for it
        "EDP_WORKER_TIMEOUT": "1",
    }
    # ... and the S3 events of three uploads, waiting in the ingest queue
    for key in (*COUNT_KEYS, *QUIET_KEYS):
        aws.s3.put_object(Bucket=bucket, Key=key, Body=b"data")
    messages = aws.receive(ingest_url, 3)
    assert len(messages) == 3

    # When the store Lambda gets them as one SQS batch (plus a message that is not JSON)
    # ... and the emit Lambda runs on its schedule once the quiet period is over
    stored, emitted = store_then_emit(clean_python, messages, ingest_arn, env=base_env,
                                      wait=2.2, work=tmp_path)

    # Then no record is reported as failed (the poison one became a dead letter)
    assert stored["result"] == {"batchItemFailures": []}
    # ... the quiet batch fired (by emit, or by the store step itself when its deadline
    # had passed by the time the store invocation ran: it is caught up, its clock the
    # wall clock), and emit delivered both batches' events
    assert emitted["result"]["fired"] in (0, 1)
    assert emitted["result"]["delivered"] == 2
    # ... having asked the ingest queue the template names how many messages wait (the
    # three the store Lambda took are in flight, not waiting)
    assert emitted["result"]["waiting"] == 0
    assert emitted["result"]["failed"] == emitted["result"]["parked"] == 0
    # ... which reached the queue behind the rule on the edp bus, one per batch
    events = [json.loads(m["Body"]) for m in aws.receive(out_url, 2)]
    assert {(e["detail"]["prefix"], e["detail"]["object-count"], e["detail"]["trigger"])
            for e in events} == EXPECTED
    for event in events:
        assert event["detail-type"] == "package-objects-ready"
        assert event["source"] == SEEDS_SOURCE
        assert event["resources"] == [f"arn:aws:s3:::{bucket}"]
        assert event["detail"]["bucket"] == bucket
    # ... and the code ran from the zip, with boto3 from the runtime and psycopg's binary build
    for outcome in (stored, emitted):
        modules = outcome["modules"]
        for name in ("edp", "pydantic_core", "orjson"):
            assert modules[name].startswith(str(task_dir)), (name, modules[name])
    assert emitted["modules"]["boto3"].startswith(str(runtime_dir))
    if kind == "postgres":
        assert stored["psycopg_impl"] == "binary"
        assert stored["modules"]["psycopg"].startswith(str(task_dir))
    # ... into the test's database: two batches, and the poison message as a dead letter
    url = (request.getfixturevalue("pg_database")["url"] if kind == "postgres"
           else base_env["EDP_DATABASE_URL"])
    assert count_rows(url, "batches") == 2
    assert count_rows(url, "dead_letters") == 1


REVISION_POINTER = ".quilt/named_packages/lab/run-1/1733400000"
TOP_HASH = "0123456789abcdef" * 4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_stack_turns_a_new_package_revision_into_one_package_ready_event(
    aws: Aws, aws_environment: dict[str, str], task_dir: Path, runtime_dir: Path,
    clean_python: Path, tmp_path: Path,
) -> None:
    # Given a registry whose S3 events reach the ingest queue through the template's
    # RegistryPointersRule (rendered for PackageReadyRegistries = that registry),
    source, registry = aws.bucket(), aws.bucket()
    ingest_url, ingest_arn = aws.queue("ingest")
    template = load_template(EDP_TEMPLATE)
    pattern = render(template["Resources"]["RegistryPointersRule"]["Properties"]["EventPattern"],
                     {"PackageReadyRegistries": [registry]}, {})
    rule = unique("registry-pointers")
    aws.events.put_rule(Name=rule, EventPattern=json.dumps(pattern))
    aws.events.put_targets(Rule=rule, Targets=[{"Id": "ingest", "Arn": ingest_arn}])
    # ... an edp bus whose rule takes package-ready events to a queue,
    bus = unique("quilt-edp")
    aws.events.create_event_bus(Name=bus)
    out_url, out_arn = aws.queue("out")
    aws.events.put_rule(Name=rule, EventBusName=bus, EventPattern=json.dumps(
        {"detail-type": ["package-ready"], "source": [SEEDS_SOURCE]}))
    aws.events.put_targets(Rule=rule, EventBusName=bus, Targets=[{"Id": "out", "Arn": out_arn}])
    # ... and the Lambdas' environment as deploy/edp.yaml renders it (a 1 s delay)
    edp_env = stack_environment(
        {"BucketName": [source], "PackageReadyRegistries": [registry],
         "PackageReadyDelay": "1", "EventBusName": bus},
        {"DBSecret": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:unused",
         "EventBus": bus, "IngestQueue": aws.queue("ingest")[0]},
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
        "PYTHONPATH": f"{task_dir}{os.pathsep}{runtime_dir}", "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1", **aws_environment, **edp_env,
        "EDP_DATABASE_URL": f"sqlite:///{tmp_path / 'edp.db'}",
        "EDP_EVENTBRIDGE_RAW_KEYS": "true", "EDP_WORKER_TIMEOUT": "1",
    }
    assert edp_env["EDP_PACKAGE_READY_REGISTRIES"] == registry

    # When quilt3 pushes a revision (files, manifest, then the pointer holding the top hash)
    aws.s3.put_object(Bucket=registry, Key="lab/run-1/a.csv", Body=b"data")
    aws.s3.put_object(Bucket=registry, Key=f".quilt/packages/{TOP_HASH}", Body=b"{}")
    aws.s3.put_object(Bucket=registry, Key=REVISION_POINTER, Body=TOP_HASH.encode())
    messages = aws.receive(ingest_url, 3, timeout=3)
    # ... only the pointer's event reaches the queue,
    assert [json.loads(m["Body"])["detail"]["object"]["key"] for m in messages] == [
        REVISION_POINTER]
    # ... the store Lambda records it (a timer starts), and once the delay is over the
    # emit Lambda runs on its schedule
    stored, emitted = store_then_emit(clean_python, messages, ingest_arn, env=env, wait=1.3,
                                      work=tmp_path)
    again = invoke(clean_python, "edp.aws.handlers.emit_handler", scheduled_event(),
                   env={**env, "AWS_LAMBDA_FUNCTION_NAME": "edp-emit"}, work=tmp_path)

    # Then the emit Lambda read the pointer and published one package-ready event,
    assert stored["result"] == {"batchItemFailures": []}
    assert emitted["result"]["delivered"] == 1
    assert again["result"]["delivered"] == 0
    events = [json.loads(m["Body"]) for m in aws.receive(out_url, 2, timeout=3)]
    assert len(events) == 1
    (event,) = events
    assert event["detail-type"] == "package-ready"
    assert event["source"] == SEEDS_SOURCE
    assert event["resources"] == [f"arn:aws:s3:::{registry}"]
    assert event["detail"]["package-name"] == "lab/run-1"
    assert event["detail"]["bucket"] == registry
    assert event["detail"]["top-hash"] == TOP_HASH
    # ... and no batch: the registry is not a watched bucket, the pointer is Quilt's own
    assert count_rows(env["EDP_DATABASE_URL"], "batches") == 0


def count_rows(url: str, table: str) -> int:
    """The number of rows of a store table (SQLite or PostgreSQL URL)."""
    query = f"SELECT count(*) FROM {table}"  # table names come from this file only
    if url.startswith("sqlite:///"):
        import sqlite3

        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            return int(conn.execute(query).fetchone()[0])
    import psycopg

    with psycopg.connect(url) as pg:
        row = pg.execute(query).fetchone()
    return int(row[0]) if row else 0
