#!/usr/bin/env bash
# Download KubeRay's CustomResourceDefinitions (ray.io/v1 RayCluster, RayJob, RayService) for the
# offline manifest validation in tests/test_deploy.py. They are upstream artifacts and are not kept in
# this repository. Destination: $DRPT_KUBERAY_CRDS, default ../shared/kuberay-crds (relative to the
# repository root), the directory the tests read.
#   bash scripts/fetch_kuberay_crds.sh            # KubeRay v1.7.0, the operator version deploy/ targets
#   KUBERAY_VERSION=v1.7.0 DRPT_KUBERAY_CRDS=/tmp/crds bash scripts/fetch_kuberay_crds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${KUBERAY_VERSION:-v1.7.0}"
DEST="${DRPT_KUBERAY_CRDS:-../shared/kuberay-crds}"
BASE="https://raw.githubusercontent.com/ray-project/kuberay/${VERSION}/ray-operator/config/crd/bases"
mkdir -p "$DEST"
for kind in rayclusters rayjobs rayservices; do
  f="ray.io_${kind}.yaml"
  echo "fetch: ${BASE}/${f} -> ${DEST}/${f}"
  curl -fsSL --retry 3 -o "${DEST}/${f}.part" "${BASE}/${f}"
  mv "${DEST}/${f}.part" "${DEST}/${f}"
done
echo "fetch: KubeRay ${VERSION} CRDs in ${DEST}"
