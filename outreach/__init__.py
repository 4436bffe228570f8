"""outreach package."""
