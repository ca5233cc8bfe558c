"""prisma_mm.zoo"""
