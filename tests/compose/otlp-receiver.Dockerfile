# Stand-in for the Jaeger all-in-one image of docker-compose.yml where no registry can be reached
# (only tests/test_compose.py uses it): an OTLP/HTTP receiver on Jaeger's port 4318 that keeps
# what it receives and says, on GET /received, which services sent spans.
ARG PYTHON_IMAGE=chatstream-local/python:3.11-bookworm
FROM ${PYTHON_IMAGE}
COPY otlp_receiver.py /opt/otlp_receiver.py
USER 10001:10001
EXPOSE 4318
CMD ["python", "/opt/otlp_receiver.py"]
