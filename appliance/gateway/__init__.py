"""The LAN gateway: the only door from the clinic network to vLLM (see :mod:`appliance.gateway.app`)."""

from appliance.gateway.app import Gateway
from appliance.gateway.config import GatewayConfig, check_config, load_config_file

__all__ = ["Gateway", "GatewayConfig", "check_config", "load_config_file"]
