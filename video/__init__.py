"""Text-to-video (Make-A-Video style): the prior's UNet inflated with temporal layers. Built in issue 4."""
