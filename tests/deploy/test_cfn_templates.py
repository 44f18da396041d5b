"""Checks on the CloudFormation templates in ``deploy/``.

Two kinds of checks:

* cfn-lint finds no error and no warning in either template (skipped when
  cfn-lint is not installed, except in CI where that is a failure);
* the structure of ``deploy/edp.yaml``: every template parameter that is an
  edp setting reaches its ``EDP_*`` environment variable in both Lambdas, no
  password parameter exists, and the few numbers that must agree do.

``PARAMETER_TO_ENV`` is the contract between the template and edp's settings;
other tests may import it to check that each variable is a real edp setting.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
EDP_TEMPLATE = DEPLOY_DIR / "edp.yaml"
EXAMPLE_TEMPLATE = DEPLOY_DIR / "example-handler.yaml"
LAMBDAS = ("StoreFunction", "EmitFunction")

#: Template parameter -> the edp setting's environment variable it must set.
PARAMETER_TO_ENV: dict[str, str] = {
    "BucketName": "EDP_BUCKETS",
    "BucketIgnorePrefixes": "EDP_BUCKET_IGNORE_PREFIXES",
    "BucketPrefixDepth": "EDP_BUCKET_PREFIX_DEPTH",
    "BucketThresholdDuration": "EDP_BUCKET_THRESHOLD_DURATION",
    "BucketThresholdEventCount": "EDP_BUCKET_THRESHOLD_EVENT_COUNT",
    "BucketMaxBatchAge": "EDP_BUCKET_MAX_BATCH_AGE",
    "BucketCompleteMarkers": "EDP_BUCKET_COMPLETE_MARKERS",
    "EventBusName": "EDP_EVENTBRIDGE_BUS",
    "EventSource": "EDP_EVENT_SOURCE",
    "PackageReadyRegistries": "EDP_PACKAGE_READY_REGISTRIES",
    "PackageReadyDelay": "EDP_PACKAGE_READY_DELAY",
    "HistoryRetention": "EDP_HISTORY_RETENTION",
    "FileGatewayShares": "EDP_FILE_GATEWAY_SHARES",
}

#: Parameters that configure the infrastructure, not edp. A new parameter
#: must be added to one of the two tables (test_every_parameter_is_classified).
INFRASTRUCTURE_PARAMETERS = frozenset(
    {
        "VPC",
        "Subnets",
        "SecurityGroup",
        "DBUser",
        "DBPassword",  # (the original's; accepted and ignored)
        "DBInstanceClass",
        "DBDeletionProtection",
        "CreateEventBus",
        "EmitSchedule",
        "LambdaCodeBucket",
        "LambdaCodeKey",
        "LambdaArchitecture",
        "LogRetentionDays",
    }
)


# --------------------------------------------------------------------------
# Reading templates: a SafeLoader that turns the short CloudFormation tags
# (!Ref, !Sub, !GetAtt, ...) into their long JSON forms.


class _CfnLoader(yaml.SafeLoader):
    """YAML loader that understands CloudFormation's short-form tags."""


def _construct_cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(cast(yaml.MappingNode, node), deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _construct_cfn_tag)


def load_template(path: Path) -> dict[str, Any]:
    """Parse a CloudFormation YAML template into plain Python data."""
    with path.open(encoding="utf-8") as stream:
        # _CfnLoader is a SafeLoader: no arbitrary Python objects.
        return cast(dict[str, Any], yaml.load(stream, Loader=_CfnLoader))


_SUB_NAME = re.compile(r"\$\{(?!!)([^}]+)\}")


def referenced_names(value: Any) -> set[str]:
    """Names that ``value`` refers to via Ref, Fn::GetAtt or Fn::Sub, at any depth."""
    if isinstance(value, list):
        return set().union(*(referenced_names(item) for item in value))
    if not isinstance(value, dict):
        return set()
    if set(value) == {"Ref"}:
        return {value["Ref"]}
    if set(value) == {"Fn::GetAtt"}:
        return {value["Fn::GetAtt"][0]}
    if set(value) == {"Fn::Sub"}:
        sub = value["Fn::Sub"]
        if isinstance(sub, str):
            return set(_SUB_NAME.findall(sub))
        text, variables = sub
        return (set(_SUB_NAME.findall(text)) - set(variables)) | referenced_names(variables)
    return set().union(*(referenced_names(item) for item in value.values()))


@pytest.fixture(scope="module")
def edp() -> dict[str, Any]:
    return load_template(EDP_TEMPLATE)


def lambda_environment(template: dict[str, Any], logical_id: str) -> dict[str, Any]:
    resource = template["Resources"][logical_id]
    return cast(dict[str, Any], resource["Properties"]["Environment"]["Variables"])


# --------------------------------------------------------------------------
# cfn-lint


@pytest.mark.parametrize("template", [EDP_TEMPLATE, EXAMPLE_TEMPLATE], ids=lambda p: p.name)
def test_template_passes_cfn_lint(template: Path) -> None:
    """cfn-lint (default rules, plus the template's own Metadata config) is silent."""
    try:
        from cfnlint.api import lint_file  # type: ignore[import-untyped]
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("cfn-lint is not installed: pip install cfn-lint")

    matches = lint_file(template)

    problems = [m for m in matches if m.rule.id[:1] in {"E", "W"}]
    assert not problems, "\n".join(
        f"{m.rule.id} {template.name}:{m.linenumber}: {m.message}" for m in problems
    )


# --------------------------------------------------------------------------
# edp.yaml: settings reach the Lambdas


def test_every_parameter_is_classified(edp: dict[str, Any]) -> None:
    """Each parameter is either an edp setting (mapped to EDP_*) or infrastructure."""
    parameters = set(edp["Parameters"])

    assert parameters - set(PARAMETER_TO_ENV) - INFRASTRUCTURE_PARAMETERS == set()
    assert set(PARAMETER_TO_ENV) - parameters == set()
    assert set(PARAMETER_TO_ENV) & INFRASTRUCTURE_PARAMETERS == set()


@pytest.mark.parametrize("function", LAMBDAS)
@pytest.mark.parametrize(("parameter", "variable"), sorted(PARAMETER_TO_ENV.items()))
def test_setting_parameter_reaches_lambda_environment(
    edp: dict[str, Any], function: str, parameter: str, variable: str
) -> None:
    environment = lambda_environment(edp, function)

    assert variable in environment, f"{function} lacks {variable}"
    assert parameter in referenced_names(environment[variable]), (
        f"{function}: {variable} does not use parameter {parameter}: {environment[variable]!r}"
    )


@pytest.mark.parametrize(("parameter", "variable"), sorted(PARAMETER_TO_ENV.items()))
def test_parameter_variable_is_an_edp_setting(parameter: str, variable: str) -> None:
    """Each variable a parameter sets is read by edp (not a typo nor a retired setting)."""
    from edp.config import SETTING_NAMES, env_name

    variables = {env_name(setting) for setting in SETTING_NAMES}

    assert variable in variables, f"{parameter} sets {variable}, which is no edp setting"


def test_both_lambdas_share_one_environment(edp: dict[str, Any]) -> None:
    store, emit = (lambda_environment(edp, name) for name in LAMBDAS)

    assert store == emit


def test_environment_variables_have_the_edp_prefix(edp: dict[str, Any]) -> None:
    environment = lambda_environment(edp, "StoreFunction")

    assert all(name.startswith("EDP_") for name in environment)
    assert {"EDP_DATABASE_SECRET_ARN", "EDP_REGION", "EDP_ACCOUNT"} <= set(environment)
    # The bus -> SNS rule forwards events; the Lambdas do not publish to SNS.
    assert "EDP_SNS_TOPIC" not in environment


# --------------------------------------------------------------------------
# edp.yaml: credentials and wiring


def test_no_password_parameter(edp: dict[str, Any]) -> None:
    for name, spec in edp["Parameters"].items():
        if name == "DBPassword":  # (the original's, accepted and ignored: see below)
            continue
        assert "password" not in name.lower(), name
        assert "secret" not in name.lower(), name
        assert not spec.get("NoEcho"), name


def test_database_credentials_come_from_the_generated_secret(edp: dict[str, Any]) -> None:
    resources = edp["Resources"]
    db = resources["DBInstance"]["Properties"]
    secret = resources["DBSecret"]["Properties"]["GenerateSecretString"]

    for prop in ("MasterUsername", "MasterUserPassword"):
        sub = db[prop]["Fn::Sub"]
        assert sub.startswith("{{resolve:secretsmanager:${DBSecret}:SecretString:"), prop
    assert secret["GenerateStringKey"] == "password"
    assert "DBUser" in referenced_names(secret["SecretStringTemplate"])
    assert db["StorageEncrypted"] is True
    assert db["PubliclyAccessible"] is False
    attachment = resources["DBSecretAttachment"]["Properties"]
    assert attachment["TargetId"] == {"Ref": "DBInstance"}


def test_lambdas_run_the_documented_handlers(edp: dict[str, Any]) -> None:
    resources = edp["Resources"]
    handlers = {name: resources[name]["Properties"]["Handler"] for name in LAMBDAS}

    assert handlers == {
        "StoreFunction": "edp.aws.handlers.store_handler",
        "EmitFunction": "edp.aws.handlers.emit_handler",
    }
    assert {resources[name]["Properties"]["Runtime"] for name in LAMBDAS} == {"python3.12"}


def test_store_consumes_the_ingest_queue_with_partial_batch_failures(edp: dict[str, Any]) -> None:
    resources = edp["Resources"]
    mapping = resources["StoreEventSourceMapping"]["Properties"]
    queue = resources["IngestQueue"]["Properties"]
    store_timeout = resources["StoreFunction"]["Properties"]["Timeout"]

    assert mapping["EventSourceArn"] == {"Fn::GetAtt": ["IngestQueue", "Arn"]}
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["BatchSize"] == 100
    # AWS's rule for SQS-triggered Lambdas: 6 x timeout + batching window.
    needed_visibility = 6 * store_timeout + mapping["MaximumBatchingWindowInSeconds"]
    assert queue["VisibilityTimeout"] >= needed_visibility
    # A database outage of hours must not move the backlog to the DLQ
    assert queue["RedrivePolicy"]["maxReceiveCount"] * queue["VisibilityTimeout"] >= 4 * 3600
    # Records not stored come back after the visibility timeout: the functions hold
    # firing by time that long (edp.aws.handlers), so they must know it
    for name in LAMBDAS:
        variables = lambda_environment(edp, name)
        assert int(variables["EDP_SQS_VISIBILITY_TIMEOUT"]) == queue["VisibilityTimeout"]


def test_undecodable_input_in_the_store_lambda_raises_an_alarm(
    edp: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from edp.aws.handlers import _log_rejected
    from edp.engine import StepReport
    from edp.store.base import DeadLetter

    resources = edp["Resources"]
    metric_filter = resources["DeadLettersMetricFilter"]["Properties"]
    alarm = resources["DeadLettersAlarm"]["Properties"]
    # The filter reads the store function's log group, and the alarm its metric
    assert metric_filter["LogGroupName"] == {"Ref": "StoreLogGroup"}
    [metric] = metric_filter["MetricTransformations"]
    assert (alarm["Namespace"], alarm["MetricName"]) == (
        metric["MetricNamespace"], metric["MetricName"])
    assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]
    # And its pattern matches the line the store function logs for a dead letter
    term = metric_filter["FilterPattern"].strip('"')
    report = StepReport()
    report.rejected.append(DeadLetter("sqs:arn", "message id m-1", "not JSON", "x", 0.0))
    with caplog.at_level(logging.WARNING, logger="edp.aws.handlers"):
        _log_rejected(report)
    assert [r for r in caplog.records if term in r.getMessage()]


def test_the_originals_db_password_parameter_is_accepted_and_unused(
    edp: dict[str, Any],
) -> None:
    # Old parameter files name DBPassword: the parameter exists, hidden and optional,
    param = edp["Parameters"]["DBPassword"]
    assert (param["Type"], param["Default"], param["NoEcho"]) == ("String", "", True)
    # and nothing but the rule that keeps it referenced reads it (not RDS, not an output)
    users = [name for name, resource in edp["Resources"].items()
             if "DBPassword" in referenced_names(resource)]
    assert users == []
    assert "DBPassword" not in referenced_names(edp["Outputs"])


def test_store_failures_raise_alarms(edp: dict[str, Any]) -> None:
    resources = edp["Resources"]
    # The store function fails an invocation that stored nothing (edp.aws.handlers):
    # its error metric is alarmed; records failing alone show as the queue's age
    errors = resources["StoreErrorsAlarm"]["Properties"]
    assert (errors["Namespace"], errors["MetricName"]) == ("AWS/Lambda", "Errors")
    assert errors["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": "StoreFunction"}}]
    backlog = resources["IngestBacklogAlarm"]["Properties"]
    assert (backlog["Namespace"], backlog["MetricName"]) == (
        "AWS/SQS", "ApproximateAgeOfOldestMessage")
    assert backlog["Dimensions"] == [
        {"Name": "QueueName", "Value": {"Fn::GetAtt": ["IngestQueue", "QueueName"]}}]
    # (well before the redrive policy moves a message to the DLQ)
    queue = resources["IngestQueue"]["Properties"]
    assert backlog["Threshold"] < queue["RedrivePolicy"]["maxReceiveCount"] * queue[
        "VisibilityTimeout"]
    for alarm in (errors, backlog):
        assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]


def test_s3_rule_watches_every_bucket_parameter(edp: dict[str, Any]) -> None:
    pattern = edp["Resources"]["S3EventsRule"]["Properties"]["EventPattern"]

    assert pattern["source"] == ["aws.s3"]
    assert set(pattern["detail-type"]) == {"Object Created", "Object Deleted"}
    assert pattern["detail"]["bucket"]["name"] == {"Ref": "BucketName"}


def test_registry_rule_sends_only_pointer_keys_of_the_registries(edp: dict[str, Any]) -> None:
    resources = edp["Resources"]
    rule = resources["RegistryPointersRule"]
    pattern = rule["Properties"]["EventPattern"]

    assert rule["Condition"] == "HasPackageReady"
    assert pattern["source"] == ["aws.s3"]
    assert pattern["detail-type"] == ["Object Created"]
    assert pattern["detail"]["bucket"]["name"] == {"Ref": "PackageReadyRegistries"}
    assert pattern["detail"]["object"]["key"] == [{"prefix": ".quilt/named_packages/"}]
    assert rule["Properties"]["Targets"][0]["Arn"] == {"Fn::GetAtt": ["IngestQueue", "Arn"]}
    # ... and the ingest queue (and its DLQ) accept what that rule sends
    for queue_policy in ("IngestQueuePolicy", "DeadLetterQueuePolicy"):
        statement = resources[queue_policy]["Properties"]["PolicyDocument"]["Statement"][0]
        assert "RegistryPointersRule" in referenced_names(statement["Condition"])


@pytest.mark.parametrize("role", ["StoreRole", "EmitRole"])
def test_both_roles_may_read_the_registries_pointers(edp: dict[str, Any], role: str) -> None:
    """Whichever Lambda finds a revision's timer due reads its pointer."""
    statements = edp["Resources"][role]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    conditional = {s["Fn::If"][1]["Sid"]: s["Fn::If"] for s in statements if "Fn::If" in s}

    condition, pointers, otherwise = conditional["RegistryPointers"]
    assert condition == "HasPackageReady" and otherwise == {"Ref": "AWS::NoValue"}
    assert pointers["Action"] == "s3:GetObject"
    partition, in_aws, elsewhere = pointers["Resource"]["Fn::If"]
    assert partition == "InAwsPartition"
    assert elsewhere == {"Fn::Sub": "arn:${AWS::Partition}:s3:::*/.quilt/named_packages/*"}
    # In the aws partition: one ARN per registry, as CloudFormation renders it
    separator, sub = in_aws["Fn::Split"]
    text, variables = sub["Fn::Sub"]
    joiner, registries = variables["Joined"]["Fn::Join"]
    assert registries == {"Ref": "PackageReadyRegistries"}
    rendered = text.replace("${Joined}", joiner.join(["reg-a", "reg-b"])).split(separator)
    assert rendered == ["arn:aws:s3:::reg-a/.quilt/named_packages/*",
                        "arn:aws:s3:::reg-b/.quilt/named_packages/*"]
    # And may list them: S3 then answers a missing pointer NoSuchKey, not AccessDenied
    condition, listing, _ = conditional["RegistryListing"]
    assert condition == "HasPackageReady"
    assert listing["Action"] == "s3:ListBucket" and "Condition" not in listing
    separator, sub = listing["Resource"]["Fn::If"][1]["Fn::Split"]
    text, variables = sub["Fn::Sub"]
    joiner, registries = variables["Joined"]["Fn::Join"]
    assert registries == {"Ref": "PackageReadyRegistries"}
    assert text.replace("${Joined}", joiner.join(["reg-a", "reg-b"])).split(separator) == [
        "arn:aws:s3:::reg-a", "arn:aws:s3:::reg-b"]
    condition, refresh, _ = conditional["FileGatewayRefresh"]
    assert condition == "HasFileGateway"
    assert "storagegateway:RefreshCache" in refresh["Action"]
    assert refresh["Resource"] == {"Ref": "FileGatewayShares"}


# --------------------------------------------------------------------------
# example-handler.yaml


def test_example_handler_matches_the_original_rule() -> None:
    resources = load_template(EXAMPLE_TEMPLATE)["Resources"]
    pattern = resources["EventBridgeRule"]["Properties"]["EventPattern"]

    assert pattern["detail-type"] == ["package-objects-ready"]
    assert pattern["detail"]["bucket"] == [{"Ref": "BucketName"}]
    assert resources["Lambda"]["Properties"]["Runtime"] == "python3.12"


# --------------------------------------------------------------------------
# deploy/README.md: the parameter table is the users' reference


def test_the_readme_lists_every_parameter_and_keeps_old_parameter_files(
    edp: dict[str, Any],
) -> None:
    """Each parameter of edp.yaml has a row in deploy/README.md's table, the original's
    DBPassword included (the template accepts it: the README must not say to drop it)."""
    readme = (DEPLOY_DIR / "README.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(\w+)` \|", readme, flags=re.MULTILINE))

    assert set(edp["Parameters"]) - rows == set()
    assert not re.search(r"drop\s+`DBPassword`", readme)


@pytest.mark.parametrize("policy", ["IngestQueuePolicy", "DeadLetterQueuePolicy",
                                    "EventsTopicPolicy"])
def test_queues_and_topic_refuse_requests_without_tls(edp: dict[str, Any], policy: str) -> None:
    statements = edp["Resources"][policy]["Properties"]["PolicyDocument"]["Statement"]
    [deny] = [s for s in statements if s["Effect"] == "Deny"]
    assert deny["Principal"] == "*"
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    # (on the resource the Allow statement grants)
    [allow] = [s for s in statements if s["Effect"] == "Allow"]
    assert deny["Resource"] == allow["Resource"]


@pytest.mark.parametrize("value", ["0", "1", "60", "3599", "3600", "3601", "9999", "10000",
                                   "86400", "7776000"])
def test_history_retention_parameter_allows_what_the_setting_takes(
    edp: dict[str, Any], value: str
) -> None:
    """A value the stack accepts must not stop both functions at their start."""
    from edp.config import Settings

    pattern = edp["Parameters"]["HistoryRetention"]["AllowedPattern"]
    try:
        Settings(history_retention=value)
        taken = True
    except ValueError:
        taken = False
    assert bool(re.fullmatch(pattern, value)) == taken
