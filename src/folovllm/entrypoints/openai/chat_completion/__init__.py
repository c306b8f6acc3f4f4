"""chat_completion endpoint: protocol (schemas), serving (engine -> response), api_router (HTTP)."""
