"""What the pipeline knows about Windows guests: version families, virtio drivers, disk signatures."""
