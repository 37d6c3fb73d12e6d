# A stand-in for python:3.11-slim-bookworm, for machines that reach no container registry
# (scripts/images.py builds it only when the public image cannot be pulled). FROM a Debian
# bookworm root file system made by debootstrap and `docker import`ed (Python 3.11, as the
# public image), it gives the Dockerfiles what they use of the public one: `python` and `pip`
# on the PATH, outside the system's Python, and a CA bundle pip trusts.
ARG ROOTFS_IMAGE=chatstream-local/debian:bookworm
FROM ${ROOTFS_IMAGE}
# The build machine's CA bundle: where it reaches PyPI through a TLS-inspecting proxy, only its
# own bundle makes pip trust the connection.
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /usr/local/py \
    && ln -s /usr/local/py/bin/python /usr/local/bin/python \
    && ln -s /usr/local/py/bin/pip /usr/local/bin/pip
ENV PATH=/usr/local/py/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    LANG=C.UTF-8
CMD ["python3"]
