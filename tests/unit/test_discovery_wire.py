"""discovery.proto keeps Envoy's envoy.service.discovery.v3 field numbers (wire compatibility)."""

import pytest

from meshproxy._proto.meshproxy.v1 import bootstrap_pb2, discovery_pb2

ENVOY_FIELDS = {
    discovery_pb2.DiscoveryRequest: dict(version_info=1, node=2, resource_names=3, type_url=4,
                                         response_nonce=5, error_detail=6, resource_locators=7),
    discovery_pb2.DiscoveryResponse: dict(version_info=1, resources=2, canary=3, type_url=4,
                                          nonce=5, control_plane=6),
    discovery_pb2.DeltaDiscoveryRequest: dict(
        node=1, type_url=2, resource_names_subscribe=3, resource_names_unsubscribe=4,
        initial_resource_versions=5, response_nonce=6, error_detail=7,
        resource_locators_subscribe=8, resource_locators_unsubscribe=9),
    discovery_pb2.DeltaDiscoveryResponse: dict(system_version_info=1, resources=2, type_url=4,
                                               nonce=5, removed_resources=6, control_plane=7,
                                               removed_resource_names=8),
    discovery_pb2.Resource: dict(version=1, resource=2, name=3, aliases=4, ttl=6, resource_name=8),
    discovery_pb2.RpcStatus: dict(code=1, message=2, details=3),   # google.rpc.Status
    discovery_pb2.ControlPlane: dict(identifier=1),
    discovery_pb2.ResourceLocator: dict(name=1, dynamic_parameters=2),
    bootstrap_pb2.Node: dict(id=1, cluster=2),                     # envoy.config.core.v3.Node
}


@pytest.mark.parametrize("message", ENVOY_FIELDS, ids=lambda m: m.DESCRIPTOR.name)
def test_field_numbers_match_envoy(message):
    got = {f.name: f.number for f in message.DESCRIPTOR.fields}
    assert got == ENVOY_FIELDS[message]


def test_any_resources_carry_our_type_urls():
    from google.protobuf import any_pb2
    from meshproxy._proto.meshproxy.v1 import resources_pb2
    a = any_pb2.Any()
    a.Pack(resources_pb2.Runtime(name="r"))
    assert a.type_url == "type.googleapis.com/meshproxy.v1.Runtime"
