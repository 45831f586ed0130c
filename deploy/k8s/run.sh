#!/usr/bin/env bash
# Run a study on the Kubernetes cluster kubectl points at, in the manner of optuna-examples'
# kubernetes/mlflow: build the image, apply the Secret, the stores and MLflow, then the
# workers, then registration and serving.
#
#   cp deploy/.env.example deploy/.env && $EDITOR deploy/.env     # every password
#   deploy/k8s/run.sh            # GPU=1: the workers on GPUs (tuner-job-gpu.yaml)
#
# IMAGE (GPU_IMAGE) names an image the cluster can pull (push it there first); the default,
# digitune:latest, suits a local cluster after `kind load docker-image digitune:latest`.
set -euo pipefail
cd "$(dirname "$0")"
if [ -f ../.env ]; then set -a; . ../.env; set +a; fi
for name in POSTGRES_PASSWORD MINIO_ROOT_USER MINIO_ROOT_PASSWORD MLFLOW_ADMIN_PASSWORD MLFLOW_SECRET_KEY; do
    [ -n "${!name:-}" ] || { echo "error: set $name in deploy/.env or the environment" >&2; exit 2; }
done
IMAGE=${IMAGE:-digitune:latest}
GPU_IMAGE=${GPU_IMAGE:-digitune-gpu:latest}

docker build -f ../Dockerfile -t "$IMAGE" ../..
[ -z "${GPU:-}" ] || docker build -f ../Dockerfile.gpu -t "$GPU_IMAGE" ../..

# Manifests with the images named above; the Secret's values reach kubectl on its standard
# input, never in its command line.
apply() { sed -e "s#digitune:latest#$IMAGE#" -e "s#digitune-gpu:latest#$GPU_IMAGE#" "$@" | kubectl apply -f -; }
envsubst '$POSTGRES_PASSWORD $MINIO_ROOT_USER $MINIO_ROOT_PASSWORD $MLFLOW_ADMIN_PASSWORD $MLFLOW_SECRET_KEY' \
    < secret.yaml | kubectl apply -f -
apply postgres.yaml minio.yaml mlflow.yaml
kubectl wait --for=condition=complete job/bucket --timeout=10m
kubectl rollout status deployment/mlflow --timeout=10m

workers=tuner; [ -z "${GPU:-}" ] || workers=tuner-gpu
apply "$workers-job.yaml"
echo "the study runs: kubectl logs -f job/$workers; MLflow: kubectl port-forward svc/mlflow 5000"
kubectl wait --for=condition=complete "job/$workers" --timeout=24h

apply register-job.yaml
kubectl wait --for=condition=complete job/register --timeout=1h
kubectl logs job/register
apply serve.yaml
# Ready once a @champion is loaded: the first one is promoted from a serve pod, which has
# MNIST's test set and MLflow's address and user.
echo "registered as @challenger; make it @champion if it is better on the test set:"
echo "  kubectl exec deploy/serve -- digitune promote"
