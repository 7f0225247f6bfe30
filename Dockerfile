# edgecascade: one image for every tier (region / edge / device).
# The tier is chosen by the command (python -m tier2_region | tier1_edge | tier0_device);
# all settings come from EDGECASCADE_<SECTION>__<KEY> environment variables.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN groupadd --system --gid 10001 edgecascade \
 && useradd --system --uid 10001 --gid edgecascade --create-home --home-dir /home/edgecascade \
        --shell /usr/sbin/nologin edgecascade

WORKDIR /opt/edgecascade/src
COPY . .

# Install the package, then place the committed demo models into per-role repositories
# with the same placement `edgecascade up` uses:
#   device-models  <- examples/models/charlm-device.int8.onnx   (as charlm-device)
#   edge-models    <- examples/models/charlm-edge.onnx          (as charlm-edge)
#   region-models  <- examples/models/charlm-device.onnx and examples/models/charlm-edge.onnx
RUN pip install --no-cache-dir . \
 && for role in device edge region; do \
        edgecascade repo demo --role "$role" --repo "/var/lib/edgecascade/$role-models" --models-dir examples/models; \
    done \
 && chown -R edgecascade:edgecascade /var/lib/edgecascade

USER edgecascade
WORKDIR /home/edgecascade

# Defaults run the region; compose overrides command/env per tier.
ENV EDGECASCADE_SERVER__HOST=0.0.0.0 \
    EDGECASCADE_SERVER__PORT=8001 \
    EDGECASCADE_SERVER__NODE_ID=region-1 \
    EDGECASCADE_REPOSITORY__PATH=/var/lib/edgecascade/region-models

EXPOSE 8001

CMD ["python", "-m", "tier2_region"]
