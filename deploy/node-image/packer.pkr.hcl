# Packer (HCL2) snippet: bake vnet-cni into a node image. Merge the variables and the build block
# into your template; the source (azure-arm, qemu, ...) is yours. The tarball comes from
# deploy/node-image/release.sh.
#
# The build VM runs systemd, so install.sh enables vnet-agent.service the normal way; --no-start
# keeps the agent from running on the build VM (it would take IP addresses for the build VM's NIC
# and leave state in the image). The nodes booted from the image start it before the kubelet.
# Building an image root offline instead (chroot, mkosi, debootstrap)? Run
#   install.sh install --destdir /path/to/root
# which creates the enable symlink itself and starts nothing.

variable "vnet_cni_tarball" {
  type        = string
  description = "Path to vnet-cni-<version>-linux-amd64.tar.gz"
}

variable "vnet_cni_sha256" {
  type        = string
  description = "SHA-256 of the tarball (the .sha256 file release.sh writes next to it)"
}

build {
  sources = ["source.azure-arm.node"]

  provisioner "file" {
    source      = var.vnet_cni_tarball
    destination = "/tmp/vnet-cni.tar.gz"
  }

  provisioner "shell" {
    execute_command  = "chmod +x {{ .Path }}; sudo -E sh -e '{{ .Path }}'"
    environment_vars = ["VNET_CNI_SHA256=${var.vnet_cni_sha256}"]
    inline = [
      "echo \"$VNET_CNI_SHA256  /tmp/vnet-cni.tar.gz\" | sha256sum --check --strict",
      "mkdir -p /tmp/vnet-cni",
      "tar -xzf /tmp/vnet-cni.tar.gz -C /tmp/vnet-cni --strip-components=1",
      "sh /tmp/vnet-cni/install.sh install --no-start",
      "rm -rf /tmp/vnet-cni /tmp/vnet-cni.tar.gz",
    ]
  }
}
