"""gho2kvm: Ghost/VMDK Windows disk images to libvirt domains on KVM."""

__version__ = "0.1.0"
