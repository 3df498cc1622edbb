import logging
import os

from character_em.jobs import job_log, read_param
from character_em.llm import hub

# This rule runs on the login node in front of the lab: the plan, the disk check and any refusal are
# shown on the terminal as well as written to the log.
terminal = os.fdopen(os.dup(2), "w", buffering=1)
with job_log(snakemake.log[0]):
    logging.getLogger(hub.__name__).addHandler(logging.StreamHandler(terminal))
    hub.prefetch(read_param(snakemake.params.models))
