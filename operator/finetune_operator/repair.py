"""Drift repair: a FineTuneJob's ConfigMap, progress Secret and rendezvous Service put back as the builders say.

A child deleted or edited by hand is recreated (ConfigMap, Service), patched back (ConfigMap data) or recreated
(a Service whose shape differs), comparing against the watch caches, so a steady job costs no request. Creates go
through `Children.create_one` (409 = done; another owner's object is only logged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from finetune_api.spec import FineTuneJobSpec
from finetune_operator import builders
from finetune_operator.caches import Caches
from finetune_operator.children import Children, Created
from finetune_operator.k8s import Kube
from finetune_operator.observe import data_digest, service_shape
from finetune_operator.record import JobRecord, Key

log = logging.getLogger(__name__)

SECRET_RETRIES = 3  # passes that try the progress Secret again after its ConfigMap was recreated (GC race)


@dataclass
class Repair:
    """Puts the ConfigMap, its Secret and the Service back; the caches say what exists."""

    kube: Kube
    caches: Caches
    children: Children

    async def __call__(self, record: JobRecord, key: Key, owner: builders.Owner, spec: FineTuneJobSpec) -> bool:
        """Put the ConfigMap and the Service (multi-pod jobs) back as the builders say: recreate a missing one, patch
        (ConfigMap data) or recreate (Service) a drifted one. A spec edit refreshes the ConfigMap the same way
        (restarted pods read the new configuration). True: look again soon (an old object is still being removed)."""
        if not self.caches.drift_repair:
            return False  # no caches to compare against (drift repair needs the ConfigMap and Service watches)
        again = await self._repair_configmap(record, key, owner, spec)
        if builders.needs_service(spec):
            again = await self._repair_service(key, owner) or again
        return again

    async def _repair_configmap(self, record: JobRecord, key: Key, owner: builders.Owner,
                                spec: FineTuneJobSpec) -> bool:
        desired = builders.build_configmap(owner, spec)
        name = desired["metadata"]["name"]
        cm = self.caches.configmap(key, owner.uid, name)
        if cm is not None:
            if not cm.deleting and cm.data_digest != data_digest(desired["data"]):
                await self.kube.patch("v1", "ConfigMap", owner.namespace, cm.name, {"data": desired["data"]})
                log.info("%s/%s: ConfigMap %s put back to the spec", *key, cm.name)
            return await self._recreate_secret(record, owner, cm.uid)
        created = await self.children.create_one(owner, desired)
        if created.obj is None:
            return _refused(key, created)
        if created.existed:  # the watch is behind
            if created.obj.get("data") != desired["data"]:
                await self.kube.patch("v1", "ConfigMap", owner.namespace, name, {"data": desired["data"]})
            return False
        log.info("%s/%s: ConfigMap %s recreated", *key, name)
        record.secret_retries = SECRET_RETRIES
        return await self._recreate_secret(record, owner, created.obj["metadata"]["uid"])

    async def _recreate_secret(self, record: JobRecord, owner: builders.Owner, configmap_uid: str) -> bool:
        """The progress Secret is owned by the ConfigMap: a recreated ConfigMap needs a new one. The old one may still
        be on its way out (garbage collection), answering 409; a few later passes try again (Secrets are not read)."""
        if record.secret_retries <= 0:
            return False
        created = await self.children.create_one(owner, self.children.secret(owner, configmap_uid))
        if not created.existed:
            record.secret_retries = 0
            return False
        record.secret_retries -= 1
        return record.secret_retries > 0

    async def _repair_service(self, key: Key, owner: builders.Owner) -> bool:
        desired = builders.build_service(owner)
        svc = self.caches.service(key, owner.uid, desired["metadata"]["name"])
        if svc is not None and not svc.deleting and svc.shape != service_shape(desired["spec"]):
            await self.kube.delete("v1", "Service", owner.namespace, svc.name)
            log.info("%s/%s: Service %s differed from the spec; recreating it", *key, svc.name)
            svc = None
        if svc is not None:
            return False
        created = await self.children.create_one(owner, desired)
        if created.obj is None:
            return _refused(key, created)
        log.info("%s/%s: Service %s recreated", *key, desired["metadata"]["name"])
        return False

def _refused(key: Key, created: Created) -> bool:
    """A repair that met an object it may not touch (or may not create): log it; a stale owner's object is waited
    out."""
    if created.conflict is not None or created.invalid is not None:
        log.warning("%s/%s: %s", *key, created.conflict or created.invalid)
    return created.stale
