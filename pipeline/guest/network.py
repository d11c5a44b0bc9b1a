"""The guest's old network settings, read from a LOCAL copy of its SYSTEM hive.

Windows keeps each IPv4 interface's settings under
``<ControlSet>\\Services\\Tcpip\\Parameters\\Interfaces\\{GUID}`` (``EnableDHCP``, ``IPAddress``,
``SubnetMask``, ``DefaultGateway``, ``NameServer``, ``Domain``; the ``Dhcp*`` values a lease left) and
IPv6 DNS servers under ``Tcpip6\\Parameters\\Interfaces\\{GUID}\\NameServer`` (Vista and later; static
IPv6 *addresses* live in binary NSI blobs that are not read). Which adapter an interface belongs to
is ``Control\\Network\\{4D36E972-E325-11CE-BFC1-08002BE10318}\\{GUID}\\Connection`` (``Name``, the
connection's name as shown in "Network Connections", and ``PnpInstanceID``); the NIC's driver
service is ``Enum\\<PnpInstanceID>\\Service`` (or the ``Ndi\\Service`` of the net class entry whose
``NetCfgInstanceId`` is the GUID). These are the values of a real XP/2003/7/10 hive.
"""

from __future__ import annotations

import os

from pipeline.guest.hiveread import Tree, read_tree
from pipeline.model.guest import NetInterface

NET_CLASS = "{4D36E972-E325-11CE-BFC1-08002BE10318}"  # the network adapter device class
_UNSET = ("", "0.0.0.0")


def _addrs(tree: Tree, rel: str, name: str) -> tuple[str, ...]:
    return tuple(a for a in tree.strings(rel, name) if a not in _UNSET)


def interfaces(hive_path: str | os.PathLike[str], control_set: str, *, image_id: str | None = None,
               step: str = "inspect") -> tuple[NetInterface, ...]:
    """Every ``Tcpip\\Parameters\\Interfaces\\{GUID}`` of ``control_set`` in the local SYSTEM hive, with
    its adapter; interfaces with an adapter first, then by GUID (the hive's order)."""
    cs = f"\\{control_set}"
    tcpip = read_tree(hive_path, f"{cs}\\Services\\Tcpip\\Parameters\\Interfaces", image_id=image_id,
                      step=step)
    if tcpip is None:
        return ()
    tcpip6 = read_tree(hive_path, f"{cs}\\Services\\Tcpip6\\Parameters\\Interfaces", image_id=image_id,
                       step=step)
    network = read_tree(hive_path, f"{cs}\\Control\\Network\\{NET_CLASS}", max_depth=3, image_id=image_id,
                        step=step)
    classes: Tree | None = None
    out = []
    for guid in tcpip.children():
        if not guid.startswith("{"):
            continue
        t = tcpip
        name = pnp = driver = None
        if network is not None and network.has(f"{guid}\\Connection"):
            name = network.string(f"{guid}\\Connection", "Name")
            pnp = network.string(f"{guid}\\Connection", "PnpInstanceID")
        if pnp:
            enum = read_tree(hive_path, f"{cs}\\Enum\\{pnp}", max_depth=1, image_id=image_id, step=step)
            driver = enum.string("", "Service") if enum is not None else None
        if driver is None and name is not None:
            if classes is None:
                classes = read_tree(hive_path, f"{cs}\\Control\\Class\\{NET_CLASS}", max_depth=3,
                                    image_id=image_id, step=step) or Tree()
            driver = _class_driver(classes, guid)
        dhcp = t.dword(guid, "EnableDHCP")
        addresses = _addrs(t, guid, "IPAddress")
        metrics = tuple(int(m) for m in t.strings(guid, "DefaultGatewayMetric") if m.isdigit())
        out.append(NetInterface(
            guid=guid, dhcp=dhcp != 0, addresses=addresses,
            masks=t.strings(guid, "SubnetMask")[:len(addresses)],
            gateways=_addrs(t, guid, "DefaultGateway"), gateway_metrics=metrics,
            dns_servers=_addrs(t, guid, "NameServer"), dns_suffix=t.string(guid, "Domain") or None,
            ipv6_dns_servers=tcpip6.strings(guid, "NameServer") if tcpip6 is not None else (),
            dhcp_address=(t.string(guid, "DhcpIPAddress") or None) if dhcp != 0 else None,
            dhcp_mask=(t.string(guid, "DhcpSubnetMask") or None) if dhcp != 0 else None,
            dhcp_gateways=_addrs(t, guid, "DhcpDefaultGateway") if dhcp != 0 else (),
            dhcp_dns_servers=_addrs(t, guid, "DhcpNameServer") if dhcp != 0 else (),
            adapter=name, pnp_instance=pnp, driver=driver))
    return tuple(sorted(out, key=lambda i: i.adapter is None))


def _class_driver(classes: Tree, guid: str) -> str | None:
    for entry in classes.children():
        if (classes.string(entry, "NetCfgInstanceId") or "").lower() == guid.lower():
            return classes.string(f"{entry}\\Ndi", "Service")
    return None


