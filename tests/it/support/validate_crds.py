"""Validates the Prometheus Operator objects (ServiceMonitor, PrometheusRule) in rendered
manifests against the operator's own schemas: kubernetes-validate carries none for them.

The schemas come as pydantic models generated from the operator's CRDs (PyPI:
cloudcoil-models-prometheus-operator). Strict like `kubernetes-validate --strict`: pydantic
drops a field it does not know, so each object must come back from its model unchanged.
Usage: validate_crds.py FILE...; prints one line per object, exits 1 on any error."""

import sys

import yaml
from cloudcoil.models.prometheus_operator import v1


def differences(sent, back, path=""):
    """Where `back` (the model's dump) is not `sent` (the manifest)."""
    if isinstance(sent, dict) and isinstance(back, dict):
        for key in sorted(set(sent) | set(back)):
            where = f"{path}.{key}" if path else key
            if key not in back:
                yield f"{where}: not in the schema"
            elif key not in sent:
                yield f"{where}: added by the schema ({back[key]!r})"
            else:
                yield from differences(sent[key], back[key], where)
    elif isinstance(sent, list) and isinstance(back, list) and len(sent) == len(back):
        for i, (a, b) in enumerate(zip(sent, back)):
            yield from differences(a, b, f"{path}[{i}]")
    elif sent != back:
        yield f"{path}: {sent!r} became {back!r}"


failed = False
for path in sys.argv[1:]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        if not str(doc.get("apiVersion", "")).startswith("monitoring.coreos.com/"):
            continue
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        model = getattr(v1, str(doc.get("kind")), None)
        if doc.get("apiVersion") != "monitoring.coreos.com/v1" or model is None:
            print(f"ERROR {path} {name}: no schema for {doc.get('apiVersion')}")
            failed = True
            continue
        try:
            back = model.model_validate(doc).model_dump(
                mode="json", by_alias=True, exclude_none=True
            )
        except Exception as e:  # pydantic's ValidationError, with every field that failed
            print(f"ERROR {path} {name}: {e}")
            failed = True
            continue
        wrong = list(differences(doc, back))
        if wrong:
            print(f"ERROR {path} {name}: " + "; ".join(wrong))
            failed = True
        else:
            print(f"OK {path} {name}")
sys.exit(1 if failed else 0)
